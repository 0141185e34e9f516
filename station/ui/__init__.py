"""`station ui`: the operator's web page, a subscriber of the verdict stream like any bridge.

Its own process: a crash here, or a browser that reads slowly, can never slow
or stop the line. Standard library HTTP server (no framework to install or
patch on a plant PC), static files shipped in the package, nothing fetched
from the internet. The serving path (`station run`) never imports this package.
"""
