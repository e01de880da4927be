"""The real dataset_tools host limiter, noting each cool-down it is asked for."""

from __future__ import annotations

from dataset_tools.politeness import HostLimiter


class RecordingLimiter(HostLimiter):
    def __init__(self):
        super().__init__(max_connections=4, requests_per_second=0)
        self.cool_downs = []

    def cool_down(self, seconds):
        self.cool_downs.append(seconds)
        super().cool_down(seconds)
