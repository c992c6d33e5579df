import sys

from segbatch.cli import main

sys.exit(main())
