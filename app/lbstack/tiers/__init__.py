"""The tiers a child process can run: balancer, proxy (both routers) and server."""
