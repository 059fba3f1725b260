"""QC that watches the picture: identity per segment, a lip-sync proxy, frozen video and jumps at cuts."""

# Under this many pixels on a side a video is too small to judge a face in (the tiny test models render
# 64 px wide): the picture gates are skipped, and qc.json says why. Here, not in .picture: no dlib import.
MIN_SIDE = 128
