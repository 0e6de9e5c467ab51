"""python -m sparselayer.trl: rewrite the GRPOConfig field table in docs/trl.md from sparselayer.trl.fields."""
import sys

from .fields import DOC, with_table

DOC.write_text(with_table(DOC.read_text()))
sys.stdout.write(f"wrote {DOC}\n")
