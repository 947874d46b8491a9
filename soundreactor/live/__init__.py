"""`soundreactor live`: a web page streams a camera, a screen or a video to the model and plays the audio back.

protocol.py is the wire protocol between the page (static/) and the server; server.py the aiohttp app; lanes.py a
connection's bounded queues; slots.py steps the connections' frames together on one `Streams` (engines.py builds
it), relay.py sends them to Triton instead; frames.py decodes the JPEGs; recorder.py keeps each take.
"""
