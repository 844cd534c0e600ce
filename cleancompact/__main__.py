import sys

from cleancompact.cli import main

sys.exit(main())
