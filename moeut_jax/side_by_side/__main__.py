"""python -m moeut_jax.side_by_side: see moeut_jax/side_by_side/__init__.py."""
import sys

from moeut_jax.side_by_side.cli import main

sys.exit(main())
