"""nc_lib: neural collapse, measured and taught."""
__version__ = "0.1.0"
