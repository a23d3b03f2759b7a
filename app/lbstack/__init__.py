"""lbstack: a load-balancing stack of separate Unix processes on aiohttp."""
