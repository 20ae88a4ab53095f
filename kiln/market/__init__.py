"""Market data shared by training, export, serving and benchmarks of the forecasting family: OHLCV bars
(reading, validation, gap policy, calendars) and the scale-free technical-indicator features.

Serving imports this package, never ``training``: ``POST /forecast`` validates bars and computes
features with exactly the code the trainer used.
"""
