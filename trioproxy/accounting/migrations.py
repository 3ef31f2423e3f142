"""The usage store's schema, as versioned migrations (both SQLite and PostgreSQL)."""

from __future__ import annotations

__all__ = ["MIGRATIONS"]

# Versioned migrations, applied in order at start-up inside one locked transaction. Never edit
# a released entry: append a new version. The SQL must run on both SQLite and PostgreSQL.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (1, (
        """CREATE TABLE usage_records (
            request_id TEXT PRIMARY KEY NOT NULL,
            started_at DOUBLE PRECISION NOT NULL,
            provider TEXT, api TEXT, transport TEXT, method TEXT, path TEXT,
            status INTEGER, streamed BOOLEAN,
            model_requested TEXT, model TEXT, response_id TEXT, upstream_request_id TEXT,
            input_tokens BIGINT, output_tokens BIGINT,
            cache_read_tokens BIGINT, cache_write_tokens BIGINT, reasoning_tokens BIGINT,
            audio_input_tokens BIGINT, audio_output_tokens BIGINT,
            accepted_prediction_tokens BIGINT, rejected_prediction_tokens BIGINT,
            raw_usage TEXT, stop_reason TEXT, end_reason TEXT, error TEXT,
            cost_usd DOUBLE PRECISION,
            ttfb_ms DOUBLE PRECISION, duration_ms DOUBLE PRECISION, max_gap_ms DOUBLE PRECISION,
            bytes_in BIGINT, bytes_out BIGINT,
            key_fingerprint TEXT, key_last4 TEXT, user_agent TEXT, session_id TEXT,
            extra TEXT
        )""",
        "CREATE INDEX usage_records_upstream_request_id ON usage_records (upstream_request_id)",
        "CREATE INDEX usage_records_response_id ON usage_records (response_id)",
        "CREATE INDEX usage_records_started_at ON usage_records (started_at)",
        "CREATE INDEX usage_records_key_fingerprint ON usage_records (key_fingerprint, started_at)",
        "CREATE INDEX usage_records_session_id ON usage_records (session_id, started_at)",
    )),
    # the adopted inbound id (a gateway's log id...), kept beside the proxy's own request id
    (2, (
        "ALTER TABLE usage_records ADD COLUMN correlation_id TEXT",
        "CREATE INDEX usage_records_correlation_id ON usage_records (correlation_id)",
    )),
    # latency figures (trioproxy.protocol.latency): TTFT, ITL summary, TPOT, tokens/s, e2e, proxy time
    (3, tuple(f"ALTER TABLE usage_records ADD COLUMN {name} {kind}" for name, kind in (
        ("ttft_ms", "DOUBLE PRECISION"), ("itl_p50_ms", "DOUBLE PRECISION"),
        ("itl_p90_ms", "DOUBLE PRECISION"), ("itl_p99_ms", "DOUBLE PRECISION"),
        ("itl_max_ms", "DOUBLE PRECISION"), ("itl_count", "BIGINT"),
        ("tpot_ms", "DOUBLE PRECISION"), ("tokens_per_s", "DOUBLE PRECISION"),
        ("e2e_ms", "DOUBLE PRECISION"), ("upstream_head_ms", "DOUBLE PRECISION"),
        ("proxy_request_ms", "DOUBLE PRECISION"), ("proxy_relay_ms", "DOUBLE PRECISION"),
        ("proxy_relay_max_ms", "DOUBLE PRECISION"), ("proxy_overhead_ms", "DOUBLE PRECISION"),
        ("content_events", "BIGINT"),
    ))),    # every gap of a response as a mergeable sketch (trioproxy.protocol.gapsketch), so ITL
    # percentiles pooled over many responses are exact within 1 %; and the end to end time to
    # the last content event (where client benchmarks stop), beside e2e_ms (to the last byte)
    (4, (
        "ALTER TABLE usage_records ADD COLUMN itl_sketch TEXT",
        "ALTER TABLE usage_records ADD COLUMN last_token_ms DOUBLE PRECISION",
    )),
)
