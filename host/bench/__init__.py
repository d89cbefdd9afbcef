"""On-board latency of a model: tuned against untuned, through the tracker."""
