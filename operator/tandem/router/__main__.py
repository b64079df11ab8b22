"""``python -m tandem.router``: run the router (see `tandem.router.main`)."""

from tandem.router.main import main

raise SystemExit(main())
