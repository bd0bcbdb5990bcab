"""The reader: a source's frames into host batch buffers, ahead of the model.

``buffers`` (the reusable host buffers and the ``Batch`` the model takes), ``batchfill`` (which rows make a
batch, read or decoded into one buffer; exact-or-refused checks), ``decode_workers`` (``--workers N``
processes running ``batchfill``) and ``readahead`` (the reader thread or the workers, in batch order). No
model here: ``engine`` (the mapper) scores what the reader hands it.
"""
