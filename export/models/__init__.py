"""One module per part of video-SALMONN, each called with its graph's input names."""
