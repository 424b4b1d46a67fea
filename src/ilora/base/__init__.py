"""ilora.base: the tiny default base VLM, built and pretrained on general and Atari grounding data (``ilora base``).

A layer above ``models/`` (which builds and loads any VLM), ``general/`` and ``atari/`` (whose
data it trains on and whose words its tokenizer learns).
"""
