"""What every Shoal service shares: server lifecycle, addresses, config, logs, metrics.

Nothing here knows about a particular service; service packages import this
package and never each other. The package itself imports nothing: a module is
loaded when it is used, so a short-lived command (a container health probe) pays
only for what it needs.
"""
