"""Images people look at (PNG grids and single images) and the optional text-image scorers (``--scorer``)."""
