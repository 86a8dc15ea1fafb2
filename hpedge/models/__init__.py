"""Model adapters: what hpedge needs to know about each transformer family."""
