"""``python -m ilora``: the same command line as ``ilora``."""

import sys

from ilora.cli import main

sys.exit(main())
