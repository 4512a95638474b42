"""What tpugraph promises its consumers: the segment contract (names, inputs in order, static shapes), the
manifest that describes OUT, and the vocabulary file of --embedding-disk."""
