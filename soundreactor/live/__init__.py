"""`soundreactor live`: a web page streams a camera, a screen or a video to the model and plays the audio back.

The wire protocol between the page and the server is in protocol.py; server.py is the aiohttp app, slots.py steps
the connections' frames together on one `Streams`, relay.py sends them to Triton instead, recorder.py keeps takes.
"""
