-- GCRA state of the request rate limiter shared by every batchd process on
-- this database: one row per policy and key. Times are milliseconds since
-- the Unix epoch.
--
-- tat_ms is the key's theoretical arrival time, the moment its budget is
-- full again. A row whose tat_ms is at or before the current time is the
-- same as no row, so cleanup deletes those through rate_limits_tat.

CREATE TABLE rate_limits (
    policy     TEXT NOT NULL,
    key        TEXT NOT NULL,
    tat_ms     BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (policy, key)
);

CREATE INDEX rate_limits_tat ON rate_limits (tat_ms);
