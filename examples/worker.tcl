#!/usr/bin/env tclsh
# examples/worker.tcl -- an HTTP/1.1 worker in a tclsh of its own: not forked by the serving
# process, it registers at the server's registration path (`socket server -path`) and serves
# connections as examples/http_server.tcl's forked workers do (its `app::accept`, keep-alive by
# handing connections back).
#
# Run by a pool, which starts each worker with exec and passes the path and the limit in the
# environment (SOCKETSERVER_PATH, SOCKETSERVER_MAXCONNECTIONS):
#
#   set port [::socketserver::socket server -path /run/app/app.sock -wait head 8080]
#   ::socketserver::pool create -exec [list [info nameofexecutable] examples/worker.tcl] -workers 4
#
# or by hand, next to a server started with -path:
#
#   tclsh examples/worker.tcl ?-path /run/app/app.sock? ?-maxconnections n? ?-notifier poll|tcl?
#
# The options are `::socketserver::pool worker`'s; -path defaults to $SOCKETSERVER_PATH.
# SIGTERM or SIGINT: finish the current connection, exit 0; likewise after -maxconnections
# connections, and when the server goes away.  Exit status 1: it could not register (the
# message says why).

package require Tcl 8.6
package require socketserver

source [file join [file dirname [file normalize [info script]]] http_server.tcl] ;# app::accept
::socketserver::pool worker {*}$argv app::accept
