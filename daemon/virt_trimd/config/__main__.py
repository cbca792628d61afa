"""`python -m virt_trimd.config` prints the example config; `--markdown` the reference table."""

import sys

from virt_trimd.config.generate import example_config_yaml, schema_reference_markdown

if sys.argv[1:] == ["--markdown"]:
    sys.stdout.write(schema_reference_markdown())
else:
    sys.stdout.write(example_config_yaml())
