"""The napari plugin: reader, writers, sample data and the inference and training widgets.

Everything here is a thin layer over the core API (:mod:`..inference`, :mod:`..training`,
:mod:`..dataset`, :mod:`..io`, :mod:`..simulation`). :mod:`.layers` holds the pure-python
pieces (layer geometry, layer data from results) so they are testable without Qt.
"""
