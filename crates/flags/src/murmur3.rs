//! MurmurHash3, x86 32-bit variant (Austin Appleby's public-domain
//! algorithm from SMHasher), written as a streaming hasher so a bucket can
//! be computed from the flag name, `:` and the user id without building a
//! joined string.
//!
//! The input is read as little-endian 4-byte blocks whatever the host byte
//! order, so results are the same on every platform and equal to the
//! reference implementation on x86.

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

/// An incremental MurmurHash3 x86_32. Feeding the same bytes in any split
/// across [`write`](Self::write) calls gives the same hash.
#[derive(Debug, Clone)]
pub struct Murmur3x86_32 {
    state: u32,
    /// Bytes not yet forming a full block; only the first `pending` count.
    block: [u8; 4],
    pending: usize,
    /// Total input length; the algorithm mixes in its low 32 bits.
    length: u64,
}

impl Murmur3x86_32 {
    pub fn new(seed: u32) -> Self {
        Self {
            state: seed,
            block: [0; 4],
            pending: 0,
            length: 0,
        }
    }

    /// Feeds more input.
    pub fn write(&mut self, mut bytes: &[u8]) {
        self.length = self.length.wrapping_add(bytes.len() as u64);

        if self.pending > 0 {
            let take = (4 - self.pending).min(bytes.len());
            let (head, rest) = bytes.split_at(take);
            self.block[self.pending..self.pending + take].copy_from_slice(head);
            self.pending += take;
            bytes = rest;
            if self.pending < 4 {
                return;
            }
            self.mix_block(u32::from_le_bytes(self.block));
            self.pending = 0;
        }

        let mut blocks = bytes.chunks_exact(4);
        for block in &mut blocks {
            if let &[b0, b1, b2, b3] = block {
                self.mix_block(u32::from_le_bytes([b0, b1, b2, b3]));
            }
        }
        let tail = blocks.remainder();
        self.block[..tail.len()].copy_from_slice(tail);
        self.pending = tail.len();
    }

    /// Returns the hash of everything written so far. The hasher itself is
    /// not changed, so more input may follow.
    pub fn finish(&self) -> u32 {
        let mut hash = self.state;
        if self.pending > 0 {
            // The 1 to 3 tail bytes form a little-endian word padded with
            // zeros, scrambled like a block but not rotated into the state.
            let mut tail = [0u8; 4];
            tail[..self.pending].copy_from_slice(&self.block[..self.pending]);
            hash ^= scramble(u32::from_le_bytes(tail));
        }
        // The reference takes the length as a 32-bit integer.
        hash ^= self.length as u32;
        fmix32(hash)
    }

    fn mix_block(&mut self, block: u32) {
        self.state ^= scramble(block);
        self.state = self.state.rotate_left(13);
        self.state = self.state.wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
}

fn scramble(block: u32) -> u32 {
    block.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2)
}

/// Applies the final avalanche, which makes every input bit affect every
/// output bit.
fn fmix32(mut hash: u32) -> u32 {
    hash ^= hash >> 16;
    hash = hash.wrapping_mul(0x85eb_ca6b);
    hash ^= hash >> 13;
    hash = hash.wrapping_mul(0xc2b2_ae35);
    hash ^= hash >> 16;
    hash
}

/// Hashes `bytes` in one call.
pub fn murmur3_x86_32(bytes: &[u8], seed: u32) -> u32 {
    let mut hasher = Murmur3x86_32::new(seed);
    hasher.write(bytes);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test vectors that circulate with MurmurHash3 ports, each checked
    /// against a separate C build of the reference algorithm. The last four
    /// rows came from that build and cover every tail length.
    const KNOWN_ANSWERS: &[(&str, u32, u32)] = &[
        ("", 0, 0),
        ("", 1, 0x514e_28b7),
        ("", 0xffff_ffff, 0x81f1_6f39),
        ("hello", 0, 0x248b_fa47),
        ("hello, world", 0, 0x149b_bb7f),
        (
            "The quick brown fox jumps over the lazy dog",
            0,
            0x2e4f_f723,
        ),
        ("aaaa", 0x9747_b28c, 0x5a97_808a),
        ("Hello, world!", 0x9747_b28c, 0x2488_4cba),
        ("a", 0, 0x3c25_69b2),
        ("ab", 0, 0x9bbf_d75f),
        ("abc", 0, 0xb3dd_93fa),
        ("abcd", 0, 0x43ed_676a),
    ];

    #[test]
    fn known_answer_vectors() {
        for &(input, seed, expected) in KNOWN_ANSWERS {
            assert_eq!(
                murmur3_x86_32(input.as_bytes(), seed),
                expected,
                "input {input:?} seed {seed:#x}"
            );
        }
    }

    #[test]
    fn zero_bytes_differ_from_empty() {
        assert_eq!(murmur3_x86_32(&[0, 0, 0, 0], 0), 0x2362_f9de);
        assert_ne!(murmur3_x86_32(&[0], 0), murmur3_x86_32(&[], 0));
    }

    #[test]
    fn streaming_matches_one_shot_at_every_split() {
        for &(input, seed, expected) in KNOWN_ANSWERS {
            let bytes = input.as_bytes();
            for first in 0..=bytes.len() {
                for second in first..=bytes.len() {
                    let mut hasher = Murmur3x86_32::new(seed);
                    hasher.write(&bytes[..first]);
                    hasher.write(&bytes[first..second]);
                    hasher.write(&bytes[second..]);
                    assert_eq!(
                        hasher.finish(),
                        expected,
                        "input {input:?} split at {first} and {second}"
                    );
                }
            }
        }
    }

    #[test]
    fn finish_does_not_consume() {
        let mut hasher = Murmur3x86_32::new(0);
        hasher.write(b"hel");
        let _ = hasher.finish();
        hasher.write(b"lo");
        assert_eq!(hasher.finish(), 0x248b_fa47);
    }
}
