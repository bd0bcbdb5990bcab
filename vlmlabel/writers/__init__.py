"""Writers: put rewards next to the data, safely."""
