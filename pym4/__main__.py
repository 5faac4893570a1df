"""``python -m pym4``: the ``pym4`` command (:func:`pym4.cli.main`), for an environment
whose scripts folder is not on PATH."""
import sys

from pym4.cli import main

sys.exit(main())
