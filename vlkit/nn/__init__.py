from .gates import HardConcreteGate
from .lagrangian import LagrangianController, SparsityBudget, expected_size, full_size, kept_size
