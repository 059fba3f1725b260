"""QC that watches the picture: identity per segment, a lip-sync proxy, frozen video and jumps at cuts."""
