"""The offline demo behind ``povid demo``: POVID end to end on a synthetic world, on CPU.

Not part of the core toolkit (``povid``, ``povid_data`` and the recipes never import it):

- :mod:`povid_demo.chain`: the chain of ``tune run`` stages, the summary table;
- :mod:`povid_demo.figure`: ``summary.png`` (matplotlib);
- :mod:`povid_demo.world_model`: the world's untrained LLaVA and tokenizer;
- :mod:`povid_demo.criteria`: the base criteria (does the base hallucinate like LLaVA?).

The world itself (images, captions, annotations) is data: :mod:`povid_data.synthetic_world`.
"""
