"""``python -m xml_pipeline_llm.cli``: the same as the ``xml-pipeline-llm`` command."""

import sys

from . import main

sys.exit(main())
