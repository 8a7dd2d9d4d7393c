"""Every build-time decision: the dense plan, tile classification and its Python mirror, the NSA plan."""
