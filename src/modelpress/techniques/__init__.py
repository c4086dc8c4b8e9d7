"""Every technique, registered by importing its module: one line each. A technique module holds its
stage config, its handler and, where it stores weights in a new way, its stored form."""
from . import cluster  # noqa: F401
from . import distill  # noqa: F401
from . import finetune  # noqa: F401
from . import lowrank  # noqa: F401
from . import prune  # noqa: F401
from . import quantize  # noqa: F401
from . import structured  # noqa: F401
from . import nm  # noqa: F401
from . import blocks  # noqa: F401
from . import qat  # noqa: F401
from . import precision  # noqa: F401
