"""Pure building blocks: topics, protocol frames, diffs, value encoding, errors. No I/O."""
