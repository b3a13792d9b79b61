import sys

from dsv3.bench import main

sys.exit(main())
