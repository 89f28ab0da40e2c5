-- The W3C trace context of the request that created a batch, so every
-- attempt of its items can continue that trace (for example in the
-- traceparent header of a webhook delivery).
ALTER TABLE batches ADD COLUMN traceparent TEXT;
