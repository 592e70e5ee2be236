"""One module per tab; each exposes `create_<tab>_tab(ctx, ...) -> <Tab>` (a dataclass of its components)."""
