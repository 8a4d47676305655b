"""The state store (SQLite or Modal Dict), every key it holds, and named locks."""
