"""``python -m napari_var_emitter`` is the ``var-emitter`` command."""

from .cli import main

raise SystemExit(main())
