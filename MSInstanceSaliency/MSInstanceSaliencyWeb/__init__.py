"""The browser face of MSInstanceSaliency (`msis view`, docs/WEB.md): trame-slicer serves Slicer's own MRML scene and
slice views to a web page. It sits beside MSInstanceSaliencyMRML, whose scene code it shares with the Slicer
module; it is not installed into Slicer (no trame there), only used from Python with trame-slicer installed."""
