"""Performance tools: `vsal bench` and the machine limits (bandwidth, FLOPs) it measures on the spot."""
