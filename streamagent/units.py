"""Time constants, in milliseconds: every timestamp in streamagent is epoch milliseconds."""
SECOND_MS = 1_000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
