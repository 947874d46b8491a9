"""Serving many streams with NVIDIA Triton Inference Server: model repository, server process, client.

Triton's sequence batcher (Direct strategy) keeps every request of a stream in one batch slot of one model
instance; our model steps one `Streams` backend per instance, with Triton's slots as its slots.
"""
