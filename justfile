# Contributor recipes. The README's commands are plain cargo; these only
# save typing.

# Run every test in the workspace (the README's test command).
test:
    cargo test --workspace

# Format check and lints, as CI expects them.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings

# Queue throughput on a fresh SQLite file.
bench:
    cargo bench -p queue --bench throughput

# Library crates must not depend on actix or on each other's concrete stores.
layers:
    ! cargo tree -p domain -e normal | grep -E 'actix|rusqlite|tokio-postgres'
    ! cargo tree -p queue -e normal | grep -E 'actix|rusqlite|sqlite-store'
