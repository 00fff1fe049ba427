"""Ray actors wrapping the engine for each role, and the pools that own them."""
