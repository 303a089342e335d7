"""Applications above the library: they use every layer, and nothing in the library uses them."""
