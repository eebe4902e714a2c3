"""Fixtures of the registrar integration tests (defined in registrar_kit).

Imported here, once, so pytest offers them to every module of this folder
by name; the test modules import only the helpers they call.
"""

from catalog_kit import browser, page  # noqa: F401  (the catalog's browser fixtures)
from registrar_kit import (  # noqa: F401  (fixtures, registered by being imported here)
    docker,
    etcd_endpoint,
    reg_prefix,
    view,
    whoami,
    whoami_health,
)
