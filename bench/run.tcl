# bench/run.tcl -- the driver of `make bench` (issue 3).
#
#   TCLLIBPATH=/path/to/build tclsh bench/run.tcl ?-quick? ?-runs N? ?-configs LIST?
#
# Needs: the built package (make all), the `limit` and `clients` examples
# (cargo build --release --example limit --example clients), Tclx, ab and wrk.
#
# Configurations: plain (one Tcl process, socket -server), socketserver with
# N = 1, 2, 4, 8 forked workers (ss1 ... ss8), and limit (bare Rust, one
# process per core); and ss1000, 1000 workers, which runs only the herd and ab
# scenarios, for the dispatcher's cost per connection against N=8's (issue 10;
# see many_workers).  Each run starts every configuration in turn (the order
# rotates from run to run), runs the scenarios against it and stops it, so the
# configurations are interleaved; at least 3 runs.
#
# Workers that are not forked (issue 13): the serving process opens a named
# registration socket (socket server -path, a fresh path under /tmp per
# start) and starts its workers as programs of their own that register there
# (bench/ss_server.tcl -spawn).  ss8exec: 8 separate tclsh processes with the
# same handler and notifier as ss8's forked ones.  ss1py, ss4py: 1 and 4
# Python workers (examples/worker.py), whose req/s is reported beside ss1's
# and ss4's, no target.  Their answer differs a little (HTTP/1.1, a 39-byte
# body) and they have no /slow, so the slow scenario skips them; nor can they
# be asked for wake-ups (no control port).  Configuration "forkexec": ss8
# and ss8exec at once, bursts of ab -c 1 and ab -c 32 through them in turn
# (as "proxy" below), the dispatcher thread's CPU per connection summed over
# the bursts: the target, exec'd / forked = 1.00 ± 0.25 at c=1 and at c=32.
# Measured as separate configurations, minutes apart, the c=1 figure swings
# between about 20 and 45 µs with the machine's load (twice 1.37 for ss8exec
# / ss8 where bursts in turn gave 1.0).
#
# Handlers (bench/http.tcl; same work, same answer): plain uses the
# fileevent-driven one (one process must not block on a client); socketserver
# workers use the synchronous one (a worker serves one connection at a time,
# so its users write handlers that way, and it saves the fileevent wake-ups).
# Notifiers: socketserver workers switch to the package's poll notifier
# (::socketserver::notifier poll), as pool workers do; plain runs stock Tcl,
# as Tcl users do today.  The full run adds ss8tcl: N=8 workers that keep Tcl
# 8.6's own notifier, whose every wake-up is a round trip through its
# notifier thread, to show what the poll notifier saves.  -configs picks
# others, e.g. ssNfe (the fileevent handler).
#
# Scenarios, all on 127.0.0.1, each client bounded in time:
#   herd  ab -n HERD -c 1: sequential connections to idle workers -> wake-ups
#         per connection (socketserver's own counters) and CPU per 1000
#         connections (c=1)
#   ab    ab -n N -c 32 (a connection per request) -> req/s, p50, p99, max,
#         and CPU per 1000 connections (c=32)
#   wrk   wrk -d D -c 32 -H 'Connection: close' -> req/s, p50, p99, max
#   slow  wrk as above with bench/slowmix.lua: one request in ten is /slow,
#         which blocks its process for 5 ms -> req/s, p50, p99, max
# Parked connections (issue 11), three more configurations, each with its own
# scenarios: plainka (plain_server.tcl -keepalive: one Tcl process that keeps
# HTTP/1.1 connections open in its event loop), ss4park (4 workers, -wait
# head, the handler hands the connection back with `socket park` after every
# answer) and ss4waitnone (the same with -wait none: today's dispatch).
#   ka      wrk -c 64 -d KA, keep-alive (plainka, ss4park) -> req/s, CPU per
#           request (dispatcher and workers apart), hand-backs per request
#           (the dispatcher's count: proves the connections went back)
#   kaclose the same with -H 'Connection: close' (ss4park): the same server,
#           closing after every request
#   idle    ss4park: wrk -c 32 -d IDLE -H 'Connection: close' and requests
#           one at a time (idlebase), then 10,000 idle connections opened
#           and parked, and the same again (idle10k) -> p99 with/without
#           (the target is on the requests one at a time: wrk's saturated
#           p99 is mostly queueing, and too noisy), and the serving
#           process's RSS growth (VmRSS, before the 10,000 and after)
#   slowc   100 connections that send nothing and 100 that drip a request
#           head one byte every 0.3 s, then normal requests one at a time,
#           each given 1 s (ss4park, ss4waitnone) -> p50, p99, answered.
#           The issue sets no target; the line checks -wait head's p99
#           against the bound of its test, 100 ms.
# The PROXY protocol (issue 12), configuration "proxy": two servers at once,
# ss4hap (4 workers behind HAProxy, plain TCP) and ss4hapv2 (the same with
# HAProxy's send-proxy-v2 and the server's -proxy v2), each behind its own
# HAProxy; bursts of ab -c 32 through them take turns (so a change in the
# machine's load falls on both alike), and the serving processes' CPU per
# connection is summed over the bursts.  Their difference, run by run, is
# what reading the PROXY header costs (target <= 2 µs).  Runs only when
# haproxy is installed (scripts/deps.sh --bench).
# Two hosts behind a load balancer (issue 12), configuration "lb": two
# serving processes ss4lb (4 workers each, -proxy v2 believed only from
# 127.0.0.2, -agent) on two ports, and one HAProxy in front of both
# (send-proxy-v2 from source 127.0.0.2, weight 100, agent-check every 1 s).
# wrk -c 32 -H 'Connection: close' directly to the first host (from
# 127.0.0.1: served as a direct client, no header) and through HAProxy, in
# turns -> req/s, p50, p99, errors, CPU per request of both hosts' processes
# and of HAProxy, and PROXY headers read per request (1.00 through HAProxy:
# the row measures what it says).  Runs only when haproxy is installed.
# The idle and dripping clients and the timed requests come from the
# `clients` example (bench/clients.rs), which raises its own fd limit; the
# servers run with -backlog 1024 and, for ss4park, -maxparked 11000.
#
# CPU is the run time of every thread of the server's processes (serving
# process and workers) over the scenario: sum_exec_runtime from
# /proc/PID/task/TID/schedstat, in ns -- the quantity that utime+stime of
# /proc/PID/stat report in clock ticks, which are too coarse for ~10 ms per
# worker; the tick-based figure is kept in the CSV as cpu_all_stat, and used
# when the kernel has no schedstat.
#
# The dispatcher's own CPU is that of the serving process's thread named
# socketserver:PORT.
#
# Prints the machine, a markdown table of medians (min-max), the targets of
# issues 3 and 10 as ratios with PASS/MISS, and writes bench/results/*.csv.
# Every process it starts is stopped by pid and reaped, also on error.

package require Tcl 8.6
package require Tclx

namespace eval ::bench {
    variable here [file dirname [file normalize [info script]]]
    variable root [file dirname $here]
    variable servers {}         ;# live server records (dicts), for cleanup
    variable clients {}         ;# live client pipes, for cleanup
    variable seq 0
    variable rows {}            ;# raw measurements: {run config scenario metric value}
    variable vals               ;# (config,scenario,metric) -> list of values
    array set vals {}
    variable errors {}
    variable born               ;# pid -> start time, see note_started
    array set born {}
    variable usens [file readable /proc/[pid]/task/[pid]/schedstat]
                                ;# 1: per-thread schedstat (ns) is available
    variable clktck 100
    variable idlecount 10000    ;# parked idle connections of the idle scenario
    variable maxparked 11000    ;# ss*park's -maxparked: the idle ones, and room for the load
    variable lbsource 127.0.0.2 ;# HAProxy's source address in configuration lb
}

# ---------------------------------------------------------------- helpers

proc ::bench::say {msg} {
    puts $msg
    flush stdout
}

# Wait until CHAN is readable or MS milliseconds pass; 1 if readable.
proc ::bench::wait_readable {chan ms} {
    variable seq
    set var ::bench::w[incr seq]
    set $var 0
    fileevent $chan readable [list set $var 1]
    set id [after [expr {max(1, $ms)}] [list set $var 2]]
    try {
        vwait $var
    } finally {
        after cancel $id
        catch {fileevent $chan readable {}}
    }
    set r [set $var]
    unset $var
    return [expr {$r == 1}]
}

# Sleep MS milliseconds in the event loop (signals and timers keep working).
proc ::bench::pause {ms} {
    variable seq
    set var ::bench::p[incr seq]
    after $ms [list set $var 1]
    vwait $var
    unset $var
}

# One line from a non-blocking CHAN before DEADLINE (clock milliseconds);
# LINE names it in errors.
proc ::bench::read_line {chan deadline what {line "port line"}} {
    while {1} {
        if {[gets $chan got] >= 0} {
            return $got
        }
        if {[eof $chan]} {
            error "$what: ended before it printed its $line"
        }
        set left [expr {$deadline - [clock milliseconds]}]
        if {$left <= 0} {
            error "$what: no $line within the time limit"
        }
        wait_readable $chan $left
    }
}

# Fields 3 and on of /proc/PID/stat (after the command name), or "" if PID is gone.
proc ::bench::procstat {pid} {
    if {[catch {open /proc/$pid/stat} f]} {
        return {}
    }
    set s [read $f]
    close $f
    return [string range $s [expr {[string last ")" $s] + 2}] end]
}

# Remember when PIDS started (field 22 of stat): a worker is reaped by its
# serving process, not by us, so its pid may be reused by then; alive, and so
# killpids, must not take the newcomer for it.
proc ::bench::note_started {pids} {
    variable born
    foreach pid $pids {
        set born($pid) [lindex [procstat $pid] 19]
    }
}

# Is PID alive (and not a zombie), and still the process note_started saw?
proc ::bench::alive {pid} {
    variable born
    set rest [procstat $pid]
    if {$rest eq "" || [lindex $rest 0] in {Z X}} {
        return 0
    }
    return [expr {![info exists born($pid)] || [lindex $rest 19] eq $born($pid)}]
}

proc ::bench::killpids {signal pids} {
    foreach pid $pids {
        if {[alive $pid]} {
            catch {kill $signal $pid}
        }
    }
}

# Reap PID, a child of this process started with exec & (HAProxy) and
# killed: else it stays a zombie, also after this process (a container's
# init may not reap it).  Bounded: 1 s.
proc ::bench::reap {pid} {
    for {set i 0} {$i < 50} {incr i} {
        if {[catch {wait -nohang $pid} r] || [llength $r]} {
            return
        }
        pause 20
    }
}

# Reads the non-blocking CHAN until EOF or the DEADLINE (clock milliseconds).
# Returns {data finished}; finished is 0 if the deadline came first.
proc ::bench::read_to_eof {chan deadline} {
    set data ""
    while {1} {
        append data [read $chan]
        if {[eof $chan]} {
            return [list $data 1]
        }
        set left [expr {$deadline - [clock milliseconds]}]
        if {$left <= 0} {
            return [list $data 0]
        }
        wait_readable $chan $left
    }
}

# Run CMD (a list) with its output captured, killed by pid after TIMEOUT ms.
# Returns a dict: output, timedout, status.
proc ::bench::run_cmd {cmd timeout} {
    variable clients
    set chan [open "|$cmd 2>@1" r]
    set pids [pid $chan]
    dict set clients $chan $pids
    fconfigure $chan -blocking 0
    set timedout 0
    try {
        lassign [read_to_eof $chan [expr {[clock milliseconds] + $timeout}]] out finished
        if {!$finished} {
            set timedout 1
            killpids SIGKILL $pids
        }
    } finally {
        fconfigure $chan -blocking 1
        set status 0
        if {[catch {close $chan} msg opts]} {
            set ec [dict get $opts -errorcode]
            if {[lindex $ec 0] eq "CHILDSTATUS"} {
                set status [lindex $ec 2]
            } elseif {[lindex $ec 0] eq "CHILDKILLED"} {
                set status "killed by [lindex $ec 2]"
            }
        }
        dict unset clients $chan
    }
    return [dict create output $out timedout $timedout status $status]
}

# CPU time, in ns, of every thread of PIDS whose name matches the glob pattern
# THREADS: {ns stat_ns}, where ns comes from schedstat when the kernel has it,
# else from stat.
proc ::bench::cpu {pids {threads *}} {
    variable clktck
    variable usens
    set ns 0
    set ticks 0
    foreach pid $pids {
        # The process's stat counts its threads that have ended too; a thread's
        # counts only that thread.
        set stats [expr {$threads eq "*" ? "/proc/$pid/stat" : {}}]
        foreach task [glob -nocomplain /proc/$pid/task/*] {
            if {$threads ne "*"} {
                if {[catch {open $task/comm} ch]} {
                    continue
                }
                set name [string trim [read $ch]]
                close $ch
                if {![string match $threads $name]} {
                    continue
                }
                lappend stats $task/stat
            }
            if {![catch {open $task/schedstat} ch]} {
                set ns [expr {$ns + [lindex [read $ch] 0]}]
                close $ch
            }
        }
        foreach file $stats {
            if {![catch {open $file} ch]} {
                set s [read $ch]
                close $ch
                set rest [string range $s [expr {[string last ")" $s] + 2}] end]
                # Fields 14 and 15 of stat; rest starts at field 3.
                set ticks [expr {$ticks + [lindex $rest 11] + [lindex $rest 12]}]
            }
        }
    }
    set statns [expr {$ticks * 1000000000 / $clktck}]
    return [list [expr {$usens ? $ns : $statns}] $statns]
}

proc ::bench::record {run config scenario metric value} {
    variable rows
    variable vals
    lappend rows [list $run $config $scenario $metric $value]
    lappend vals($config,$scenario,$metric) $value
}

proc ::bench::median {list} {
    set s [lsort -real $list]
    set n [llength $s]
    if {$n == 0} {
        return {}
    }
    if {$n % 2} {
        return [lindex $s [expr {$n / 2}]]
    }
    return [expr {([lindex $s [expr {$n / 2 - 1}]] + [lindex $s [expr {$n / 2}]]) / 2.0}]
}

# ---------------------------------------------------------------- servers

# Is NAME one of the parked-connection configurations (see the top)?
proc ::bench::parkcfg {name} {
    return [regexp {^(plainka|ss\d+(park|waitnone))$} $name]
}

# How the workers of configuration NAME start (ss_server.tcl's -spawn):
# exec (ssNexec), python (ssNpy), else fork.
proc ::bench::spawn {name} {
    if {[regexp {^ss\d+(exec|py)$} $name -> kind]} {
        return [dict get {exec exec py python} $kind]
    }
    return fork
}

# Is NAME one of the servers behind HAProxy (see the top)?
proc ::bench::hapcfg {name} {
    return [regexp {^ss\d+hap(v2)?$} $name]
}

# Starts HAProxy on a free port in front of the server of REC (with
# send-proxy-v2 for ss*hapv2); returns REC with port the frontend's, and
# haproxy its pid.
proc ::bench::haproxy {rec} {
    set option [expr {[string match *v2 [dict get $rec name]] ? "send-proxy-v2" : ""}]
    lassign [haproxy_start [list "127.0.0.1:[dict get $rec port] $option"]] pid fport
    dict set rec haproxy $pid
    dict set rec pids [concat [dict get $rec pids] $pid]
    dict set rec port $fport
    return $rec
}

# Starts HAProxy on a free port of 127.0.0.1, in the foreground (-db), one
# thread, mode tcp, round robin over SERVERS (each the rest of a `server`
# line: address and options); returns {pid port} once its frontend takes a
# connection (bounded; killed by pid if it does not).
proc ::bench::haproxy_start {servers} {
    set s [socket -server list -myaddr 127.0.0.1 0]
    set fport [lindex [fconfigure $s -sockname] 2]
    close $s
    set conf [file tempfile path /tmp/socketserver-bench-haproxy.cfg]
    puts $conf "global\n    maxconn 1024\n    nbthread 1\ndefaults\n    mode tcp\n    timeout connect 5s
    timeout client 30s\n    timeout server 30s\nfrontend in\n    bind 127.0.0.1:$fport
    default_backend host\nbackend host"
    set i 0
    foreach server $servers {
        puts $conf "    server h[incr i] $server"
    }
    close $conf
    set pid [exec haproxy -db -f $path >& /dev/null &]
    set deadline [expr {[clock milliseconds] + 5000}]
    try {
        while {[catch {close [socket 127.0.0.1 $fport]}]} {
            if {[clock milliseconds] > $deadline} {
                killpids SIGKILL $pid
                reap $pid
                error "haproxy did not listen on $fport within 5 s"
            }
            pause 20
        }
    } finally {
        file delete $path
    }
    return [list $pid $fport]
}

# The number of workers of a socketserver configuration (ssN...), else 0.
proc ::bench::nworkers {name} {
    if {![regexp {^ss(\d+)} $name -> n]} {
        return 0
    }
    return $n
}

# A configuration with this many workers or more measures only the
# dispatcher's cost (the herd and ab scenarios, see many_workers).
proc ::bench::many {name} {
    return [expr {[nworkers $name] >= 100}]
}

# The command that starts ss_server.tcl with N workers, checked against this
# machine's limits: the serving process holds 3 fds per registered worker
# (RLIMIT_NOFILE, raised to what it needs, up to the hard limit), and every
# worker is a process of its own (RLIMIT_NPROC, memory).
proc ::bench::ss_command {cmd n {parked 0}} {
    set need [expr {3 * $n + 256 + $parked}]
    # This process's limits, which the server inherits.
    set f [open /proc/self/limits]
    set limits [read $f]
    close $f
    regexp -line {^Max open files\s+(\S+)\s+(\S+)} $limits -> soft hard
    regexp -line {^Max processes\s+(\S+)} $limits -> nproc
    if {$hard ne "unlimited" && $hard < $need} {
        error "$n workers need $need fds in the serving process: the hard limit\
                (ulimit -Hn) is $hard"
    }
    if {$nproc ne "unlimited" && $nproc < $n + 256} {
        error "$n workers need [expr {$n + 256}] processes: the limit (ulimit -u) is $nproc"
    }
    # Measured: ~0.4 MB of private memory per worker; 1 MB per worker is ample.
    set f [open /proc/meminfo]
    regexp -line {^MemAvailable:\s+(\d+) kB} [read $f] -> avail
    close $f
    if {[info exists avail] && $avail < ($n + 256) * 1024} {
        error "$n workers need about [expr {$n + 256}] MB of memory:\
                [expr {$avail / 1024}] MB are available"
    }
    if {$soft ne "unlimited" && $soft < $need} {
        # exec keeps the pid: the shell becomes the serving process.
        set cmd [list sh -c "ulimit -Sn $need && exec \"\$@\"" sh {*}$cmd]
    }
    return $cmd
}

# Start configuration NAME; returns its record: a dict with name, chan, port,
# pid (serving process), workers (pids), ctl (pid -> control port, socketserver
# only), pids (every process of the server).
proc ::bench::start {name ncores} {
    variable here
    variable root
    variable servers
    set tclsh [info nameofexecutable]
    set n [nworkers $name]
    switch -glob -- $name {
        plain {
            set cmd [list $tclsh [file join $here plain_server.tcl]]
        }
        plainka {
            set cmd [list $tclsh [file join $here plain_server.tcl] -keepalive]
        }
        ss*hap - ss*hapv2 {
            regexp {^ss(\d+)hap(v2)?$} $name -> n v2
            set cmd [ss_command [list $tclsh [file join $here ss_server.tcl] -workers $n \
                    -backlog 1024 -proxy [expr {$v2 ne "" ? "v2" : "none"}]] $n]
        }
        ss*lb {
            # A host of configuration lb: PROXY v2 believed only from HAProxy's
            # source address, so wrk's direct connections are served as they come.
            regexp {^ss(\d+)lb$} $name -> n
            set cmd [ss_command [list $tclsh [file join $here ss_server.tcl] -workers $n \
                    -backlog 1024 -proxy v2 -proxyfrom $::bench::lbsource/32 -agent 0] $n]
        }
        ss*park - ss*waitnone {
            variable maxparked
            regexp {^ss(\d+)(park|waitnone)$} $name -> n variant
            set cmd [list $tclsh [file join $here ss_server.tcl] -workers $n -handler park \
                    -backlog 1024 -wait [expr {$variant eq "park" ? "head" : "none"}]]
            if {$variant eq "park"} {
                lappend cmd -maxparked $maxparked
            }
            set cmd [ss_command $cmd $n [expr {$variant eq "park" ? $maxparked : 0}]]
        }
        ss* {
            # ssN: N workers, synchronous handler, poll notifier; ssNfe:
            # fileevent handler; ssNtcl: Tcl's own notifier; ssNexec, ssNpy:
            # the same as ssN with workers that register through -path.
            regexp {^ss(\d+)(fe|tcl|exec|py)?$} $name -> n variant
            set cmd [list $tclsh [file join $here ss_server.tcl] -workers $n \
                    -handler [expr {$variant eq "fe" ? "fileevent" : "sync"}] \
                    -notifier [expr {$variant eq "tcl" ? "tcl" : "poll"}]]
            if {[spawn $name] ne "fork"} {
                variable seq
                set path /tmp/socketserver-bench-[pid]-[incr seq].sock
                lappend cmd -path $path -spawn [spawn $name]
            }
            set cmd [ss_command $cmd $n]
        }
        limit {
            set cmd [list [file join $root target release examples limit] 0 $ncores]
        }
    }
    set chan [open "|$cmd 2>@stderr" r+]
    set rec [dict create name $name chan $chan port 0 pid [pid $chan] \
            workers {} ctl {} pids [pid $chan]]
    if {[info exists path]} {
        dict set rec path $path
    }
    lappend servers $rec
    fconfigure $chan -blocking 0 -buffering line
    # ss_server.tcl waits up to 5 s and 20 ms per worker for them to be armed.
    set deadline [expr {[clock milliseconds] + 20000 + 30 * $n}]
    while {1} {
        set line [read_line $chan $deadline $name]
        if {[lindex $line 0] eq "worker" && [llength $line] == 4} {
            dict set rec ctl [lindex $line 1] [lindex $line 3]
            continue
        }
        if {[lindex $line 0] eq "port"} {
            break
        }
    }
    dict set rec port [lindex $line 1]
    if {$name eq "limit"} {
        dict set rec workers [lrange $line 3 end]
    } else {
        dict set rec workers [dict get $line workers]
        if {[dict exists $line ctl]} {
            dict set rec ctl [dict get $line pid] [dict get $line ctl]
        }
    }
    dict set rec pids [concat [dict get $rec pid] [dict get $rec workers]]
    if {[hapcfg $name]} {
        set servers [lreplace $servers end end $rec]
        set rec [haproxy $rec]
    }
    set servers [lreplace $servers end end $rec]
    note_started [dict get $rec workers]
    if {[dict exists $line ready] && [dict get $line ready] < $n} {
        error "$name: only [dict get $line ready] of $n workers were armed in time"
    }
    return $rec
}

# Stop a server: Tcl servers stop when their stdin ends (the socketserver one
# kills and reaps its workers); limit on SIGTERM.  Then whatever still lives
# is killed by pid, and the pipe is closed, which reaps the serving process.
proc ::bench::stop {rec} {
    variable servers
    set chan [dict get $rec chan]
    set pids [dict get $rec pids]
    if {[dict get $rec name] eq "limit"} {
        killpids SIGTERM [dict get $rec pid]
    } else {
        catch {chan close $chan write}
    }
    set deadline [expr {[clock milliseconds] + 3000}]
    while {[clock milliseconds] < $deadline} {
        if {[catch {read $chan}] || [eof $chan]} {
            break
        }
        wait_readable $chan [expr {$deadline - [clock milliseconds]}]
    }
    # The serving process last: it reaps its workers.
    killpids SIGTERM [lreverse $pids]
    for {set i 0} {$i < 50} {incr i} {
        set left {}
        foreach pid $pids {
            if {[alive $pid]} {
                lappend left $pid
            }
        }
        if {![llength $left]} {
            break
        }
        pause 20
    }
    killpids SIGKILL [lreverse $pids]
    if {[dict exists $rec haproxy]} {
        reap [dict get $rec haproxy]
    }
    catch {fconfigure $chan -blocking 1}
    catch {close $chan}
    # The server removes its -path when it exits; not when it was killed.
    if {[dict exists $rec path]} {
        file delete [dict get $rec path]
    }
    set i [lsearch -exact $servers $rec]
    if {$i >= 0} {
        set servers [lreplace $servers $i $i]
    }
}

# Ask a control port for its line: {pid PID info DICT}.
proc ::bench::ctl_query {port} {
    set s [socket 127.0.0.1 $port]
    try {
        fconfigure $s -blocking 0
        lassign [read_to_eof $s [expr {[clock milliseconds] + 3000}]] data finished
        if {!$finished} {
            error "control port $port did not answer"
        }
    } finally {
        close $s
    }
    return [string trim $data]
}

# socketserver counters: serving process's info, and workers' wakeups and
# received summed (only when every worker has a control port: Python's have
# none).  Empty for the other configurations, and with many workers:
# asking 1000 workers takes ~0.5 s, twice per scenario (measured once: 1.000
# wake-ups per connection at c=1 with 1000 workers too).
proc ::bench::stats {rec} {
    set name [dict get $rec name]
    if {![string match ss* $name] || [many $name]} {
        return {}
    }
    set wakeups 0
    set received 0
    set serving {}
    dict for {pid port} [dict get $rec ctl] {
        set info [dict get [ctl_query $port] info]
        if {$pid == [dict get $rec pid]} {
            set serving $info
        } else {
            incr wakeups [dict get $info wakeups]
            incr received [dict get $info received]
        }
    }
    # handedback: parked connections (issue 11), 0 where the server has none.
    set stats [dict create accepted [dict get $serving accepted] \
            delivered [dict get $serving delivered] \
            handedback [expr {[dict exists $serving handedback] ? [dict get $serving handedback] : 0}]]
    if {[dict size [dict get $rec ctl]] == [llength [dict get $rec workers]] + 1} {
        dict set stats wakeups $wakeups
        dict set stats received $received
    }
    return $stats
}

# ---------------------------------------------------------------- clients

proc ::bench::ms {text} {
    # wrk's durations: 123.45us, 1.23ms, 1.02s, 1.00m
    if {![regexp {^([0-9.]+)(us|ms|s|m)$} $text -> v unit]} {
        return {}
    }
    return [expr {$v * [dict get {us 0.001 ms 1.0 s 1000.0 m 60000.0} $unit]}]
}

proc ::bench::ab {port n c} {
    set csv [file tempfile csvname]
    close $csv
    try {
        set r [run_cmd [list ab -q -r -s 10 -n $n -c $c -e $csvname \
                http://127.0.0.1:$port/] [expr {60000 + $n * 2}]]
        set out [dict get $r output]
        if {[dict get $r timedout]} {
            error "ab timed out"
        }
        set res {}
        foreach {key re} {
            complete {Complete requests:\s+(\d+)}
            failed {Failed requests:\s+(\d+)}
            non2xx {Non-2xx responses:\s+(\d+)}
            rps {Requests per second:\s+([0-9.]+)}
        } {
            if {[regexp $re $out -> v]} {
                dict set res $key $v
            } elseif {$key eq "non2xx"} {
                dict set res $key 0
            } else {
                error "ab -n $n -c $c failed: [lindex [split [string trim $out] \n] end]"
            }
        }
        set f [open $csvname]
        foreach line [split [read $f] \n] {
            lassign [split $line ,] p t
            switch -- $p {
                50 {dict set res p50 $t}
                99 {dict set res p99 $t}
                100 {dict set res max $t}
            }
        }
        close $f
        dict set res errors [expr {[dict get $res failed] + [dict get $res non2xx]}]
        return $res
    } finally {
        file delete -force $csvname
    }
}

# CLOSE 0: keep-alive (wrk's default), else every request asks "Connection: close".
proc ::bench::wrk {port seconds c {script {}} {close 1}} {
    set cmd [list wrk -t 2 -c $c -d ${seconds}s --timeout 5s --latency]
    if {$close} {
        lappend cmd -H "Connection: close"
    }
    if {$script ne ""} {
        lappend cmd -s $script
    }
    lappend cmd http://127.0.0.1:$port/
    set r [run_cmd $cmd [expr {$seconds * 1000 + 20000}]]
    set out [dict get $r output]
    if {[dict get $r timedout]} {
        error "wrk timed out"
    }
    set res {}
    if {![regexp {Requests/sec:\s+([0-9.]+)} $out -> rps]
            || ![regexp {(\d+) requests in} $out -> requests]
            || ![regexp {Latency\s+(\S+)\s+(\S+)\s+(\S+)} $out -> avg sd max]
            || ![regexp {\s50%\s+(\S+)} $out -> p50]
            || ![regexp {\s99%\s+(\S+)} $out -> p99]} {
        error "wrk failed: [lindex [split [string trim $out] \n] end]"
    }
    set errors 0
    if {[regexp {Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)} \
            $out -> a b d e]} {
        set errors [expr {$a + $b + $d + $e}]
    }
    if {[regexp {Non-2xx or 3xx responses:\s+(\d+)} $out -> x]} {
        incr errors $x
    }
    return [dict create rps $rps requests $requests p50 [ms $p50] p99 [ms $p99] \
            max [ms $max] errors $errors]
}

# ---------------------------------------------------------------- scenarios

# Run one scenario against REC, recording CPU, counters and the client's
# figures.  KIND: herd, ab, wrk, slow; ka, kaclose, idlebase, idle10k (see
# the top).
proc ::bench::scenario {run rec kind cfg} {
    variable here
    set name [dict get $rec name]
    set port [dict get $rec port]
    set serving [dict get $rec pid]
    set workers [dict get $rec workers]
    set s0 [stats $rec]
    lassign [cpu $serving] sv0 sv0t
    lassign [cpu $serving socketserver*] dp0
    lassign [cpu $workers] wk0 wk0t
    switch -- $kind {
        herd {set res [ab $port [dict get $cfg herd] 1]}
        ab {set res [ab $port [dict get $cfg abn] 32]}
        wrk {set res [wrk $port [dict get $cfg wrkd] 32]}
        slow {set res [wrk $port [dict get $cfg slowd] 32 [file join $here slowmix.lua]]}
        ka {set res [wrk $port [dict get $cfg kad] 64 {} 0]}
        kaclose {set res [wrk $port [dict get $cfg kad] 64]}
        idlebase - idle10k {set res [wrk $port [dict get $cfg idled] 32]}
    }
    pause 50
    lassign [cpu $serving] sv1 sv1t
    lassign [cpu $serving socketserver*] dp1
    lassign [cpu $workers] wk1 wk1t
    set s1 [stats $rec]
    foreach key {rps p50 p99 max errors} {
        record $run $name $kind $key [dict get $res $key]
    }
    # CPU per 1000 connections, from the requests counted by the client.
    if {$kind in {herd ab}} {
        set conns [dict get $res complete]
    } else {
        set conns [dict get $res requests]
    }
    if {$conns > 0} {
        set k [expr {1000.0 / $conns / 1e6}]   ;# ns -> ms per 1000 connections
        record $run $name $kind cpu_serving [expr {($sv1 - $sv0) * $k}]
        if {[string match ss* $name]} {
            # The dispatcher thread alone (named socketserver:PORT).
            record $run $name $kind cpu_dispatcher [expr {($dp1 - $dp0) * $k}]
        }
        if {[llength $workers]} {
            record $run $name $kind cpu_workers [expr {($wk1 - $wk0) * $k}]
        }
        record $run $name $kind cpu_all [expr {($sv1 - $sv0 + $wk1 - $wk0) * $k}]
        record $run $name $kind cpu_all_stat [expr {($sv1t - $sv0t + $wk1t - $wk0t) * $k}]
        if {[llength $s0]} {
            set accepted [expr {[dict get $s1 accepted] - [dict get $s0 accepted]}]
            if {$accepted > 0 && [dict exists $s0 wakeups]} {
                set wakeups [expr {[dict get $s1 wakeups] - [dict get $s0 wakeups]}]
                set received [expr {[dict get $s1 received] - [dict get $s0 received]}]
                record $run $name $kind wakeups_per_conn [expr {double($wakeups) / $accepted}]
                record $run $name $kind received_per_conn [expr {double($received) / $accepted}]
            }
            if {$kind in {ka kaclose}} {
                # Did the connections really go back to the dispatcher after each answer?
                set handedback [expr {[dict get $s1 handedback] - [dict get $s0 handedback]}]
                record $run $name $kind handedback_per_req [expr {double($handedback) / $conns}]
            }
        }
    }
    return $res
}

# The scenarios herd, ab, wrk and slow of REC; returns the progress line's part.
proc ::bench::general_run {run rec cfg} {
    set name [dict get $rec name]
    set r [scenario $run $rec herd $cfg]
    set line " | c=1 CPU [fmt [last $name herd cpu_all]] ms/1000"
    if {[string match ss* $name]} {
        append line ", wake-ups/conn " [fmt [last $name herd wakeups_per_conn] 3]
    }
    set r [scenario $run $rec ab $cfg]
    append line " | ab [format %.0f [dict get $r rps]]/s"
    if {[string match ss* $name]} {
        append line ", dispatcher c=1 " [fmt [last $name herd cpu_dispatcher]] \
                " c=32 " [fmt [last $name ab cpu_dispatcher]] " ms/1000"
    }
    # Many workers: only the dispatcher's cost (see many_workers).
    if {![many $name]} {
        set r [scenario $run $rec wrk $cfg]
        append line " | wrk [format %.0f [dict get $r rps]]/s"
    }
    # Python's worker has no /slow (it answers 404).
    if {$name ne "limit" && ![many $name] && [spawn $name] ne "python"} {
        set r [scenario $run $rec slow $cfg]
        append line " | slow [format %.0f [dict get $r rps]]/s\
                p99 [fmt [dict get $r p99]] ms"
    }
    return $line
}

# ---------------------------------------------------------------- exec'd workers

# Configuration "forkexec" (see the top): ss8 and ss8exec, bursts in turn,
# the order swapped every round; returns the progress line's part.
proc ::bench::forkexec_run {run cfg ncores} {
    set recs {}
    set sums {}             ;# {config c} -> {dispatcher_ns workers_ns connections}
    try {
        foreach name {ss8 ss8exec} {
            lappend recs [start $name $ncores]
            ab [dict get [lindex $recs end] port] [dict get $cfg warm] 4
        }
        for {set i 0} {$i < [dict get $cfg pairrounds]} {incr i} {
            foreach rec [expr {$i % 2 ? [lreverse $recs] : $recs}] {
                set name [dict get $rec name]
                foreach {c n} [list 1 [dict get $cfg herd] 32 [dict get $cfg pairburst]] {
                    lassign [cpu [dict get $rec pid] socketserver*] d0
                    lassign [cpu [dict get $rec workers]] w0
                    set r [ab [dict get $rec port] $n $c]
                    pause 20
                    lassign [cpu [dict get $rec pid] socketserver*] d1
                    lassign [cpu [dict get $rec workers]] w1
                    set sum [expr {[dict exists $sums [list $name $c]]
                            ? [dict get $sums [list $name $c]] : {0 0 0}}]
                    dict set sums [list $name $c] [lmap total $sum add \
                            [list [expr {$d1 - $d0}] [expr {$w1 - $w0}] [dict get $r complete]] {
                        expr {$total + $add}
                    }]
                    record $run $name forkexec$c errors [dict get $r errors]
                }
            }
        }
    } finally {
        foreach rec $recs {
            stop $rec
        }
    }
    set line ""
    dict for {key sum} $sums {
        lassign $key name c
        lassign $sum dispatcher workers conns
        set k [expr {1000.0 / max($conns, 1) / 1e6}]   ;# ns -> ms per 1000 connections
        record $run $name forkexec$c cpu_dispatcher [expr {$dispatcher * $k}]
        record $run $name forkexec$c cpu_workers [expr {$workers * $k}]
        append line " | $name c=$c dispatcher [fmt [last $name forkexec$c cpu_dispatcher]]"
    }
    return "$line µs/conn"
}

proc ::bench::forkexec_report {configs cfg} {
    if {"forkexec" ni $configs} {
        return
    }
    set columns {{forkexec1 cpu_dispatcher} {forkexec32 cpu_dispatcher} {forkexec1 cpu_workers}
        {forkexec32 cpu_workers} {forkexec32 errors 0}}
    table_rows "Exec'd against forked workers (issue 13), N=8 each, both running, bursts in turn:\
            [dict get $cfg pairrounds] × (ab -n [dict get $cfg herd] -c 1, ab -n\
            [dict get $cfg pairburst] -c 32) through each; CPU in µs per connection:" \
        {server {dispatcher c=1} {dispatcher c=32} {workers c=1} {workers c=32} {errors c=32}} \
        {{"socketserver N=8, forked" ss8 {}} {"socketserver N=8, exec'd tclsh (-path)" ss8exec {}}} \
        $columns
    ratio_row "ratio exec'd / forked" ss8exec ss8 [lrange $columns 0 end-1] 1
}

# ---------------------------------------------------------------- PROXY protocol

# Configuration "proxy" (see the top): both servers, bursts in turn; returns
# the progress line's part.
proc ::bench::proxy_run {run cfg ncores} {
    set recs {}
    try {
        foreach name {ss4hap ss4hapv2} {
            lappend recs [start $name $ncores]
            ab [dict get [lindex $recs end] port] [dict get $cfg warm] 4
        }
        set ns {0 0}
        set conns {0 0}
        for {set i 0} {$i < [dict get $cfg proxyrounds]} {incr i} {
            foreach rec $recs j {0 1} {
                lassign [cpu [dict get $rec pid]] before
                set r [ab [dict get $rec port] [dict get $cfg proxyburst] 32]
                pause 20
                lassign [cpu [dict get $rec pid]] after
                lset ns $j [expr {[lindex $ns $j] + $after - $before}]
                lset conns $j [expr {[lindex $conns $j] + [dict get $r complete]}]
                record $run [dict get $rec name] proxy errors [dict get $r errors]
            }
        }
    } finally {
        foreach rec $recs {
            stop $rec
        }
    }
    lassign [lmap n $ns c $conns {expr {$n / 1000.0 / max($c, 1)}}] without with
    record $run ss4hap proxy cpu_serving $without
    record $run ss4hapv2 proxy cpu_serving $with
    record $run ss4hapv2 proxy cost [expr {$with - $without}]
    return " | serving CPU [fmt $without] µs/conn, with PROXY v2 [fmt $with]:\
            +[fmt [expr {$with - $without}]] µs"
}

proc ::bench::proxy_report {configs cfg} {
    if {"proxy" ni $configs} {
        return
    }
    set burst "[dict get $cfg proxyrounds] × ab -n [dict get $cfg proxyburst] -c 32"
    table "Behind HAProxy (mode tcp), $burst through each, in turn; serving process CPU in µs\
            per connection:" {server {serving CPU} errors} {ss4hap ss4hapv2} \
        {{proxy cpu_serving} {proxy errors 0}}
    target "PROXY v2 header, serving CPU per connection with − without, µs (issue 12, target ≤ 2)" \
        [med ss4hapv2 proxy cost] <= 2.0 "per run: [join [lmap v $::bench::vals(ss4hapv2,proxy,cost) {fmt $v}] {, }]"
}

# Configuration "lb" (see the top): two hosts ss4lb, HAProxy in front of both;
# wrk directly to the first host and through HAProxy, in an order that
# alternates from run to run.  Returns the progress line's part.
proc ::bench::lb_run {run cfg ncores} {
    variable servers
    variable lbsource
    set hosts {}
    try {
        foreach i {1 2} {
            lappend hosts [start ss4lb $ncores]
        }
        set lines [lmap rec $hosts {
            set agent [dict get [serving_info $rec] agentport]
            format "127.0.0.1:%d send-proxy-v2 source %s weight 100\
                    agent-check agent-port %d agent-inter 1s" [dict get $rec port] $lbsource $agent
        }]
        lassign [haproxy_start $lines] hpid fport
        # stop (and cleanup) stops HAProxy with the first host, by pid, and reaps it.
        set first [lindex $hosts 0]
        set i [lsearch -exact $servers $first]
        dict lappend first pids $hpid
        dict set first haproxy $hpid
        lset servers $i $first
        lset hosts 0 $first
        set paths [list [list direct [dict get $first port]] [list haproxy $fport]]
        if {$run % 2 == 0} {
            set paths [lreverse $paths]
        }
        set pids [concat {*}[lmap rec $hosts {concat [dict get $rec pid] [dict get $rec workers]}]]
        set line ""
        foreach pair $paths {
            lassign $pair path port
            ab $port [dict get $cfg warm] 4
            set proxied0 [lmap rec $hosts {dict get [serving_info $rec] proxied}]
            lassign [cpu $pids] h0
            lassign [cpu $hpid] p0
            set r [wrk $port [dict get $cfg lbd] 32]
            pause 50
            lassign [cpu $pids] h1
            lassign [cpu $hpid] p1
            set proxied [tcl::mathop::+ {*}[lmap rec $hosts n $proxied0 {
                expr {[dict get [serving_info $rec] proxied] - $n}
            }]]
            foreach key {rps p50 p99 errors} {
                record $run lb $path $key [dict get $r $key]
            }
            set n [expr {max([dict get $r requests], 1)}]
            record $run lb $path cpu_hosts [expr {($h1 - $h0) / 1000.0 / $n}]
            record $run lb $path cpu_haproxy [expr {($p1 - $p0) / 1000.0 / $n}]
            record $run lb $path proxied_per_req [expr {double($proxied) / $n}]
            append line " | $path [format %.0f [dict get $r rps]]/s,\
                    hosts [fmt [last lb $path cpu_hosts]] µs/req"
        }
    } finally {
        foreach rec $hosts {
            stop $rec
        }
    }
    return $line
}

proc ::bench::lb_report {configs cfg} {
    if {"lb" ni $configs} {
        return
    }
    table_rows "Two hosts behind HAProxy (issue 12), each socketserver N=4 -proxy v2 -agent;\
            HAProxy send-proxy-v2, agent-check; wrk -c 32 -d [dict get $cfg lbd]s\
            -H 'Connection: close'; CPU in µs per request: both hosts' processes, HAProxy's;\
            PROXY headers read per request (both hosts' proxied):" \
        {path req/s p50 p99 errors {CPU hosts} {CPU HAProxy} {PROXY/req}} \
        {{"wrk directly to one host" lb direct} {"wrk through HAProxy to 2 hosts" lb haproxy}} \
        {{* rps 0} {* p50} {* p99} {* errors 0} {* cpu_hosts} {* cpu_haproxy} {* proxied_per_req 2}}
}

# ---------------------------------------------------------------- parked connections

# The parked-connection scenarios of REC (see the top); returns the progress
# line's part.
proc ::bench::park_run {run rec cfg} {
    variable idlecount
    set name [dict get $rec name]
    set line ""
    if {![string match *waitnone $name]} {
        set r [scenario $run $rec ka $cfg]
        append line " | keep-alive [format %.0f [dict get $r rps]]/s,\
                CPU [fmt [last $name ka cpu_all]] µs/req"
    }
    if {[string match *park $name]} {
        set r [scenario $run $rec kaclose $cfg]
        append line " | close [format %.0f [dict get $r rps]]/s"
        lassign [idle $run $rec $cfg] base with
        append line " | p99 [fmt [dict get $base p99]] ms, [fmt [dict get $with p99]] ms\
                with $idlecount parked, RSS +[fmt [last $name idle10k rss_growth_mb]] MB"
    }
    if {$name ne "plainka"} {
        set r [slowc $run $rec $cfg]
        append line " | slow clients p99 [fmt [dict get $r p99]] ms,\
                [dict get $r answered]/[dict get $r requests] answered"
    }
    return $line
}

# The serving process's [::socketserver::info PORT], through its control port.
proc ::bench::serving_info {rec} {
    return [dict get [ctl_query [dict get $rec ctl [dict get $rec pid]]] info]
}

# Until the serving process's info KEY compares OP (>= or <=) to N; bounded by
# MS milliseconds (error then).  Polled: no event says when it changes.
proc ::bench::wait_info {rec key op n ms} {
    set deadline [expr {[clock milliseconds] + $ms}]
    while {1} {
        set v [dict get [serving_info $rec] $key]
        if {[expr "\$v $op \$n"]} {
            return $v
        }
        if {[clock milliseconds] > $deadline} {
            error "the server's $key is $v after $ms ms, not $op $n"
        }
        pause 20
    }
}

# Resident set size of process PID, in kB.
proc ::bench::rss {pid} {
    set f [open /proc/$pid/status]
    set status [read $f]
    close $f
    if {![regexp -line {^VmRSS:\s+(\d+) kB} $status -> kb]} {
        error "no VmRSS for process $pid"
    }
    return $kb
}

# Starts `clients hold` against PORT with IDLE silent and DRIP dripping
# connections (one byte every 300 ms each, for at most 120 s); returns its
# channel once every connection is open.  unhold stops it.
proc ::bench::hold {port idle drip} {
    variable root
    variable clients
    set bin [file join $root target release examples clients]
    set chan [open |[list $bin hold $port $idle $drip 300 120 2>@stderr] r+]
    dict set clients $chan [pid $chan]
    fconfigure $chan -blocking 0 -buffering line
    try {
        set line [read_line $chan [expr {[clock milliseconds] + 30000}] "clients hold" \
                "ready line (its error is on stderr)"]
        if {$line ne "ready $idle $drip"} {
            error "clients hold: unexpected \"$line\""
        }
    } on error {msg opts} {
        unhold $chan
        return -options $opts $msg
    }
    return $chan
}

# Ends a `clients hold`: its stdin ends, so it closes its connections and
# exits; killed by pid if it has not within 3 s.
proc ::bench::unhold {chan} {
    variable clients
    set pids [dict get $clients $chan]
    catch {chan close $chan write}
    catch {read_to_eof $chan [expr {[clock milliseconds] + 3000}]}
    killpids SIGKILL $pids
    catch {fconfigure $chan -blocking 1}
    catch {close $chan}
    dict unset clients $chan
}

# wrk's p99 and that of requests one at a time (seq_p99) without, then with
# IDLECOUNT idle connections parked, and the serving process's RSS growth
# between (recorded as idle10k rss_growth_mb).  Returns both wrk results.
proc ::bench::idle {run rec cfg} {
    variable idlecount
    set name [dict get $rec name]
    set pid [dict get $rec pid]
    set base [scenario $run $rec idlebase $cfg]
    record $run $name idlebase seq_p99 [dict get [requests $rec $cfg] p99]
    set rss0 [rss $pid]
    set parked0 [dict get [serving_info $rec] parked]
    set chan [hold [dict get $rec port] $idlecount 0]
    try {
        wait_info $rec parked >= [expr {$parked0 + $idlecount}] 20000
        set with [scenario $run $rec idle10k $cfg]
        record $run $name idle10k seq_p99 [dict get [requests $rec $cfg] p99]
        record $run $name idle10k rss_growth_mb [expr {([rss $pid] - $rss0) / 1024.0}]
    } finally {
        unhold $chan
    }
    # The dispatcher closes them as their clients go: none left for what follows.
    wait_info $rec parked <= $parked0 10000
    return [list $base $with]
}

# Normal requests, one at a time, while 100 silent and 100 dripping
# connections are open (parked with -wait head; with -wait none the first
# ones hold every worker).  Records and returns the clients' figures.
proc ::bench::slowc {run rec cfg} {
    set name [dict get $rec name]
    set chan [hold [dict get $rec port] 100 100]
    try {
        if {[string match *park $name]} {
            wait_info $rec parked >= 200 10000
        }
        set res [requests $rec $cfg]
    } finally {
        unhold $chan
    }
    foreach key {requests answered timeouts failed p50 p99 max} {
        record $run $name slowc $key [dict get $res $key]
    }
    return $res
}

# `clients requests` against REC: at most slowcn requests one at a time, for
# at most slowcd seconds, each given 1000 ms.  Returns its dict.
proc ::bench::requests {rec cfg} {
    variable root
    set seconds [dict get $cfg slowcd]
    set r [run_cmd [list [file join $root target release examples clients] requests \
            [dict get $rec port] [dict get $cfg slowcn] $seconds 1000] \
            [expr {$seconds * 1000 + 10000}]]
    set res [string trim [dict get $r output]]
    if {[dict get $r timedout] || [dict get $r status] != 0
            || [catch {dict get $res p99}] || [dict get $res requests] == 0} {
        error "clients requests failed: $res"
    }
    return $res
}

proc ::bench::park_report {configs cfg} {
    variable idlecount
    set rows {}
    foreach {config scenario text} {
        plainka ka "plain Tcl, keep-alive"
        ss4park ka "socketserver N=4, keep-alive, park after every answer"
        ss4park kaclose "socketserver N=4, Connection: close"
    } {
        if {$config in $configs} {
            lappend rows [list $text $config $scenario]
        }
    }
    table_rows "Keep-alive (issue 11), wrk -c 64 -d [dict get $cfg kad]s; CPU in µs per request:\
            all server processes, the serving one (dispatcher), the workers:" \
        {server req/s p50 p99 max errors CPU {CPU serving} {CPU workers} {hand-backs/req}} $rows \
        {{* rps 0} {* p50} {* p99} {* max} {* errors 0} {* cpu_all} {* cpu_serving}
         {* cpu_workers} {* handedback_per_req 3}}
    if {"ss4park" in $configs} {
        table_rows "Parked idle connections, socketserver N=4 -wait head, wrk -c 32\
                -d [dict get $cfg idled]s -H 'Connection: close', then [dict get $cfg slowcn]\
                requests one at a time; RSS growth of the serving process in MB:" \
            {{} req/s p50 p99 max errors {p99 one at a time} {RSS growth}} \
            [list {"no idle connection" ss4park idlebase} \
                 [list "$idlecount parked idle connections" ss4park idle10k]] \
            {{* rps 0} {* p50} {* p99} {* max} {* errors 0} {* seq_p99} {* rss_growth_mb}}
    }
    set rows {}
    foreach {config text} {
        ss4park "socketserver N=4, -wait head (parked)"
        ss4waitnone "socketserver N=4, -wait none"
    } {
        if {$config in $configs} {
            lappend rows [list $text $config slowc]
        }
    }
    table_rows "Slow clients (100 silent, 100 dripping a byte every 0.3 s), normal requests one at a\
            time for at most [dict get $cfg slowcd] s, each given 1000 ms (a timeout counts as 1000):" \
        {server requests answered timeouts p50 p99 max} $rows \
        {{* requests 0} {* answered 0} {* timeouts 0} {* p50} {* p99} {* max}}
}

proc ::bench::park_targets {configs} {
    variable idlecount
    if {![llength [lmap c $configs {if {![parkcfg $c]} continue; set c}]]} {
        return
    }
    say "\nTargets (issue 11), ratios of medians from this run:"
    # Guards the rows below: a worker that kept its connection instead would serve wrk's
    # first 4 connections fast and leave the other 60 waiting, with no error from wrk.
    target "hand-backs per request in the keep-alive run, socketserver N=4 (target 1.00 ± 0.02)" \
        [med ss4park ka handedback_per_req] ~ 0.02 "counted by the dispatcher"
    compare "keep-alive req/s, socketserver N=4 parking after every answer / closing after\
            every request (target ≥ 1.5)" {ss4park ka rps} {ss4park kaclose rps} >= 1.5 req/s 0
    compare "keep-alive CPU per request, socketserver N=4 parking / plain Tcl keep-alive\
            (target ≤ 1.2)" {ss4park ka cpu_all} {plainka ka cpu_all} <= 1.2 µs
    compare "p99 of requests one at a time with $idlecount parked idle connections / without,\
            socketserver N=4 (target ≤ 1.2)" {ss4park idle10k seq_p99} {ss4park idlebase seq_p99} \
            <= 1.2 ms
    compare "the same under load, wrk -c 32 (its p99 is mostly queueing, too noisy for a\
            target)" {ss4park idle10k p99} {ss4park idlebase p99} - {} ms
    set growth [med ss4park idle10k rss_growth_mb]
    target "serving process's RSS growth with $idlecount parked idle connections, in MB\
            (target ≤ 10)" $growth <= 10 "[fmt $growth] MB"
    # The issue sets no ratio here; its test's bound for the same mix is 100 ms.
    set none "-wait none: p99 [fmt [med ss4waitnone slowc p99]] ms,\
            [fmt [med ss4waitnone slowc answered] 0]/[fmt [med ss4waitnone slowc requests] 0] answered"
    target "slow clients, p99 of normal requests with -wait head, in ms (target ≤ 100, the bound\
            of issue 11's test)" [med ss4park slowc p99] <= 100 $none
}

# ---------------------------------------------------------------- report

proc ::bench::fmt {v {digits {}}} {
    if {$v eq ""} {
        return "n/a"
    }
    if {$digits ne ""} {
        return [format %.${digits}f $v]
    }
    set a [expr {abs($v)}]
    if {$a >= 1000} {return [format %.0f $v]}
    if {$a >= 100} {return [format %.1f $v]}
    if {$a >= 10} {return [format %.1f $v]}
    return [format %.2f $v]
}

proc ::bench::cell {config scenario metric {digits {}}} {
    variable vals
    if {![info exists vals($config,$scenario,$metric)]} {
        return "n/a"
    }
    set l $vals($config,$scenario,$metric)
    set s [lsort -real $l]
    set med [fmt [median $l] $digits]
    if {[llength $l] < 2} {
        return $med
    }
    return "$med ([fmt [lindex $s 0] $digits]–[fmt [lindex $s end] $digits])"
}

proc ::bench::med {config scenario metric} {
    variable vals
    if {![info exists vals($config,$scenario,$metric)]} {
        return {}
    }
    return [median $vals($config,$scenario,$metric)]
}

proc ::bench::last {config scenario metric} {
    variable vals
    if {![info exists vals($config,$scenario,$metric)]} {
        return {}
    }
    return [lindex $vals($config,$scenario,$metric) end]
}

# A table's title, header and separator lines.
proc ::bench::table_head {title header} {
    say "\n$title\n"
    say "| [join $header { | }] |"
    set sep {}
    foreach h $header {
        lappend sep [expr {$sep eq "" ? "---" : "---:"}]
    }
    say "| [join $sep { | }] |"
}

# A table row: TEXT, then the ratio of the medians of CONFIG and BASE in each
# of COLUMNS ({scenario metric ?digits?} each), then EMPTY empty cells.
proc ::bench::ratio_row {text config base columns {empty 0}} {
    set row [list $text]
    foreach col $columns {
        lassign $col scenario metric
        lappend row [fmt [ratio [med $config $scenario $metric] [med $base $scenario $metric]] 2]
    }
    say "| [join [concat $row [lrepeat $empty {}]] { | }] |"
}

# A row per configuration; COLUMNS: {scenario metric ?digits?} each.
proc ::bench::table {title header configs columns} {
    table_rows $title $header [lmap c $configs {list [label $c] $c {}}] $columns
}

# ROWS: {text config scenario} each; COLUMNS: {scenario metric ?digits?}
# each, where scenario * is the row's.
proc ::bench::table_rows {title header rows columns} {
    if {![llength $rows]} {
        return
    }
    table_head $title $header
    foreach r $rows {
        lassign $r text config rowscenario
        set row [list $text]
        foreach col $columns {
            set col [lassign $col scenario]
            if {$scenario eq "*"} {
                set scenario $rowscenario
            }
            lappend row [cell $config $scenario {*}$col]
        }
        say "| [join $row { | }] |"
    }
}

proc ::bench::label {config} {
    if {$config eq "plainka"} {
        return "plain (keep-alive)"
    }
    if {[regexp {^ss(\d+)(park|waitnone)$} $config -> n variant]} {
        return "socketserver N=$n ([dict get {park {park, -wait head} waitnone {park, -wait none}} $variant])"
    }
    if {[regexp {^ss(\d+)hap(v2)?$} $config -> n v2]} {
        return "socketserver N=$n behind HAProxy[expr {$v2 ne "" ? ", send-proxy-v2, -proxy v2" : ""}]"
    }
    if {[regexp {^ss(\d+)(fe|tcl|exec|py)?$} $config -> n variant]} {
        set what [dict get {{} {} fe { (fileevent handler)} tcl { (Tcl's notifier)}
            exec { (exec'd tclsh workers)} py { (Python worker.py)}} $variant]
        return "socketserver N=$n$what"
    }
    return $config
}

# OP - : a figure for information, no target.
proc ::bench::target {text value op goal detail} {
    if {$op eq "-"} {
        say "- $text: [expr {$value eq "" ? "n/a" : [format %.3f $value]}] ($detail)"
        return
    }
    if {$value eq ""} {
        say "- $text: n/a (not measured) — MISS"
        return
    }
    switch -- $op {
        <= {set ok [expr {$value <= $goal}]}
        >= {set ok [expr {$value >= $goal}]}
        ~ {set ok [expr {abs($value - 1.0) <= $goal}]}
    }
    say "- $text: [format %.3f $value] ($detail) — [expr {$ok ? "PASS" : "MISS"}]"
}

proc ::bench::ratio {a b} {
    if {$a eq "" || $b eq "" || $b == 0} {
        return {}
    }
    return [expr {double($a) / $b}]
}

proc ::bench::write_csv {file header rows} {
    set f [open $file w]
    puts $f [join $header ,]
    foreach row $rows {
        puts $f [join $row ,]
    }
    close $f
}

# ---------------------------------------------------------------- main

# The 1-minute load average.
proc ::bench::loadavg {} {
    set f [open /proc/loadavg]
    set load [lindex [read $f] 0]
    close $f
    return $load
}

# Fraction of all CPUs' time that was not idle over the next MS milliseconds.
proc ::bench::cpubusy {ms} {
    set sample {
        set f [open /proc/stat]
        set line [lrange [gets $f] 1 end]
        close $f
        set total [tcl::mathop::+ {*}$line]
        set idle [expr {[lindex $line 3] + [lindex $line 4]}]
    }
    eval $sample
    lassign [list $total $idle] t0 i0
    pause $ms
    eval $sample
    set dt [expr {$total - $t0}]
    if {$dt <= 0} {
        return 0.0
    }
    return [expr {1.0 - double($idle - $i0) / $dt}]
}

proc ::bench::machine {} {
    set cores [exec nproc]
    set model ""
    catch {
        set f [open /proc/cpuinfo]
        regexp -line {^model name\s*:\s*(.*)$} [read $f] -> model
        close $f
    }
    set f [open /proc/sys/kernel/osrelease]
    set kernel [string trim [read $f]]
    close $f
    set wrkv ""
    catch {regexp {wrk (\S+)} [dict get [run_cmd {wrk --version} 5000] output] -> wrkv}
    set abv ""
    catch {regexp {Version (\S+)} [exec ab -V] -> abv}
    return [dict create cores $cores model $model kernel $kernel \
            tcl [info patchlevel] wrk $wrkv ab $abv]
}

proc ::bench::main {argv} {
    variable root
    variable here
    variable rows
    variable errors
    variable clktck

    set quick 0
    set runs 3
    set only {}
    for {set i 0} {$i < [llength $argv]} {incr i} {
        set opt [lindex $argv $i]
        switch -- $opt {
            -quick {set quick 1}
            -runs {
                set runs [lindex $argv [incr i]]
                if {![string is integer -strict $runs] || $runs < 3} {
                    error "-runs needs an integer >= 3"
                }
            }
            -configs {
                set only [lindex $argv [incr i]]
                foreach c $only {
                    if {![regexp {^(plain|limit|proxy|lb|forkexec|ss\d+(fe|tcl|exec|py)?)$} $c]
                            && ![parkcfg $c]} {
                        error "-configs: unknown configuration \"$c\""
                    }
                }
            }
            default {error "usage: run.tcl ?-quick? ?-runs N? ?-configs LIST?"}
        }
    }
    if {$quick} {
        set cfg [dict create abn 5000 wrkd 2 slowd 2 herd 1000 warm 200 proxyrounds 4 proxyburst 2000 \
                pairrounds 4 pairburst 2000 \
                lbd 1 kad 1 idled 1 slowcd 2 slowcn 500 \
                configs {plain ss2 ss8 limit ss1000 forkexec ss2py plainka ss4park ss4waitnone
                    proxy lb}]
    } else {
        set cfg [dict create abn 20000 wrkd 10 slowd 4 herd 2000 warm 500 proxyrounds 10 proxyburst 4000 \
                pairrounds 6 pairburst 4000 \
                lbd 3 kad 3 idled 2 slowcd 3 slowcn 1000 \
                configs {plain ss1 ss2 ss4 ss8 ss8tcl limit ss1000 ss8exec ss1py ss4py forkexec
                    plainka ss4park ss4waitnone proxy lb}]
    }
    if {[llength $only]} {
        dict set cfg configs $only
    }
    set configs [dict get $cfg configs]
    if {[auto_execok haproxy] eq ""} {
        foreach c [lmap c $configs {if {$c ni {proxy lb}} continue; set c}] {
            set configs [lsearch -all -inline -not -exact $configs $c]
            say "haproxy is not installed (scripts/deps.sh --bench): configuration $c skipped"
        }
    }
    if {[auto_execok python3] eq ""} {
        foreach c [lmap c $configs {if {[spawn $c] ne "python"} continue; set c}] {
            set configs [lsearch -all -inline -not -exact $configs $c]
            say "python3 is not installed: configuration $c (examples/worker.py) skipped"
        }
    }

    # What we need, checked before anything starts.
    foreach example {limit clients} {
        set bin [file join $root target release examples $example]
        if {![file executable $bin]} {
            error "$bin is missing: run  cargo build --release --example $example"
        }
    }
    foreach tool {ab wrk} {
        if {[auto_execok $tool] eq ""} {
            error "$tool is not installed (Debian: apache2-utils, wrk; or scripts/deps.sh --bench)"
        }
    }
    # The servers are child tclsh processes: they must find the package.
    if {![info exists ::env(TCLLIBPATH)] && [file exists [file join $root build pkgIndex.tcl]]} {
        set ::env(TCLLIBPATH) [list [file join $root build]]
    }
    set r [run_cmd [list [info nameofexecutable] << \
            {puts [package require socketserver]; package require Tclx}] 10000]
    if {[dict get $r status] != 0 || [dict get $r timedout]} {
        error "cannot load socketserver and Tclx in a child tclsh ([string trim [dict get $r output]]):\
                run make all, and set TCLLIBPATH to the build directory"
    }
    set version [string trim [dict get $r output]]
    catch {set clktck [exec getconf CLK_TCK]}
    set m [machine]
    set ncores [dict get $m cores]
    file mkdir [file join $here results]
    set stamp [clock format [clock seconds] -format %Y%m%d-%H%M%S]

    say "# socketserver benchmark[expr {$quick ? { (-quick)} : {}}]"
    say ""
    say "Machine: [dict get $m cores] cores ([dict get $m model]), Linux [dict get $m kernel],\
            Tcl [dict get $m tcl], socketserver $version, ab [dict get $m ab], wrk [dict get $m wrk];\
            loopback only."
    set busy [cpubusy 1000]
    say "Before the run: CPU [format %.0f [expr {$busy * 100}]]% busy over 1 s, load average [loadavg]."
    if {$busy > 0.15} {
        say "WARNING: the machine is busy: other processes compete with the servers and the\
                clients, so the figures below are not trustworthy. Run again on a quiet machine."
    }
    say "Runs: $runs, configurations interleaved: [join $configs {, }];\
            ab -n [dict get $cfg abn] -c 32; wrk -c 32 -d [dict get $cfg wrkd]s;\
            slow mix wrk -d [dict get $cfg slowd]s; idle herd ab -n [dict get $cfg herd] -c 1;\
            keep-alive wrk -c 64 -d [dict get $cfg kad]s; parked idle wrk -c 32\
            -d [dict get $cfg idled]s; slow clients [dict get $cfg slowcd] s."
    say ""

    set started [clock milliseconds]
    try {
        for {set run 1} {$run <= $runs} {incr run} {
            # Rotate the order from run to run.
            set k [expr {($run - 1) % [llength $configs]}]
            set order [concat [lrange $configs $k end] [lrange $configs 0 [expr {$k - 1}]]]
            foreach name $order {
                set t0 [clock milliseconds]
                set rec {}
                try {
                    if {$name in {proxy lb forkexec}} {
                        say "run $run/$runs [format %-11s $name][${name}_run $run $cfg $ncores]\
                                ([format %.1f [expr {([clock milliseconds] - $t0) / 1000.0}]] s)"
                        continue
                    }
                    set rec [start $name $ncores]
                    # Warm up (not measured): every worker has served a few, or
                    # (many workers, taken in turn) one.
                    ab [dict get $rec port] [expr {max([dict get $cfg warm], [nworkers $name])}] 4
                    set line "run $run/$runs [format %-11s $name]"
                    if {[parkcfg $name]} {
                        append line [park_run $run $rec $cfg]
                    } else {
                        append line [general_run $run $rec $cfg]
                    }
                    append line " ([format %.1f [expr {([clock milliseconds] - $t0) / 1000.0}]] s)"
                    say $line
                } on error {msg opts} {
                    lappend errors "run $run $name: $msg"
                    say "run $run/$runs $name: ERROR: $msg"
                } finally {
                    if {$rec ne ""} {
                        stop $rec
                    }
                }
            }
        }
    } finally {
        cleanup
    }
    set elapsed [expr {([clock milliseconds] - $started) / 1000.0}]
    say "\nTotal time: [format %.0f $elapsed] s; load average after the run: [loadavg]\
            (the benchmark itself loads the machine)."

    report $configs $cfg
    targets
    not_forked_targets $configs
    park_targets $configs

    # CSV: every measurement, and the summary.
    set raw [file join $here results bench-$stamp-raw.csv]
    write_csv $raw {run config scenario metric value} $rows
    set summary {}
    variable vals
    foreach key [lsort [array names vals]] {
        lassign [split $key ,] config scenario metric
        set s [lsort -real $vals($key)]
        lappend summary [list $config $scenario $metric [median $s] \
                [lindex $s 0] [lindex $s end] [llength $s]]
    }
    set sum [file join $here results bench-$stamp-summary.csv]
    write_csv $sum {config scenario metric median min max n} $summary
    set mf [file join $here results bench-$stamp-machine.csv]
    write_csv $mf {key value} [lmap {k v} $m {list $k "\"$v\""}]
    say "\nCSV: [file tail $raw], [file tail $sum], [file tail $mf] in bench/results/"

    if {[llength $errors]} {
        say "\nErrors:"
        foreach e $errors {
            say "- $e"
        }
        exit 1
    }
}

proc ::bench::report {all cfg} {
    set configs [lmap c $all {if {[parkcfg $c] || $c in {proxy lb forkexec}} continue; set c}]
    set abn [dict get $cfg abn]
    set herd [dict get $cfg herd]
    say "\nMedians of the runs, (min–max). Latencies in ms; CPU in ms per 1000 connections\
            (= µs per connection), all server processes unless stated."
    table "Fast, ab -n $abn -c 32 (a connection per request):" \
        {server req/s p50 p99 max errors CPU} $configs \
        {{ab rps 0} {ab p50} {ab p99} {ab max} {ab errors 0} {ab cpu_all}}
    set wrk [lmap c $configs {if {[many $c]} continue; set c}]
    table "Fast, wrk -c 32 -d [dict get $cfg wrkd]s -H 'Connection: close':" \
        {server req/s p50 p99 max errors} $wrk \
        {{wrk rps 0} {wrk p50} {wrk p99} {wrk max} {wrk errors 0}}
    set slow [lmap c $wrk {if {$c eq "limit" || [spawn $c] eq "python"} continue; set c}]
    table "Slow mix, wrk -c 32 -d [dict get $cfg slowd]s, one request in ten blocks its process 5 ms:" \
        {server req/s p50 p99 max errors} $slow \
        {{slow rps 0} {slow p50} {slow p99} {slow max} {slow errors 0}}
    table "Idle herd (ab -n $herd -c 1, sequential) and dispatcher cost (ab -c 32):" \
        {server {wake-ups/conn c=1} {CPU all c=1} {CPU workers c=1} {CPU serving c=1} \
             {CPU all c=32} {CPU serving c=32}} $configs \
        {{herd wakeups_per_conn 3} {herd cpu_all} {herd cpu_workers} {herd cpu_serving}
         {ab cpu_all} {ab cpu_serving}}
    say "\n(\"serving\" is the process holding the listener: for socketserver the dispatcher,\
            for plain the whole server, for limit its idle parent; limit's CPU is its per-connection floor.)"
    many_workers $configs $cfg
    not_forked_report $configs $cfg
    forkexec_report $all $cfg
    park_report $all $cfg
    proxy_report $all $cfg
    lb_report $all $cfg
}

# Issue 10: the dispatcher's cost per connection must not grow with the number
# of registered workers.  ss1000 has 1000 workers, all armed, as a pool's idle
# workers are: each connection goes to the one that has waited longest, so they
# take turns, and every one serves.  (With 8 armed and 992 registered but
# busy, the dispatcher would be spared a ready queue 1000 long and a different
# mailbox and process to wake each time: measured with the poll dispatcher,
# that case cost 10-30% less at c=1.)  Only the herd and ab scenarios run on
# it; its row in the table below is the dispatcher thread's CPU against the
# same load with 8 workers.
proc ::bench::many_workers {configs cfg} {
    set ss [lmap c [lsearch -all -inline -glob $configs ss*] {
        if {[spawn $c] ne "fork"} continue
        set c
    }]
    if {![llength $ss]} {
        return
    }
    table "Dispatcher thread only, by registered workers (all armed), ab -n [dict get $cfg herd]\
            -c 1 and ab -n [dict get $cfg abn] -c 32:" \
        {server {dispatcher c=1} {dispatcher c=32} {req/s c=1} {req/s c=32}} $ss \
        {{herd cpu_dispatcher} {ab cpu_dispatcher} {herd rps 0} {ab rps 0}}
    ratio_row "ratio N=1000 / N=8" ss1000 ss8 \
        {{herd cpu_dispatcher} {ab cpu_dispatcher} {herd rps} {ab rps}}
}

# Issue 13: {ssN {variants}} for each ssN run with workers that are not
# forked (ssNexec, ssNpy) run beside it.
proc ::bench::not_forked {configs} {
    set pairs {}
    foreach c $configs {
        if {[spawn $c] ne "fork" && [regexp {^(ss\d+)} $c -> base] && $base in $configs} {
            dict lappend pairs $base $c
        }
    }
    return $pairs
}

# Issue 13: each configuration whose workers are not forked beside the same
# number of forked ones, and a row of ratios of medians after each.
proc ::bench::not_forked_report {configs cfg} {
    set pairs [not_forked $configs]
    if {![dict size $pairs]} {
        return
    }
    set columns {{ab rps 0} {wrk rps 0} {ab cpu_all} {ab cpu_workers} {ab cpu_dispatcher}}
    table_head "Workers that are not forked (issue 13), registered through -path: req/s with ab\
            -n [dict get $cfg abn] -c 32 and wrk -c 32 -d [dict get $cfg wrkd]s, CPU in ms per\
            1000 connections with ab -c 32 (all server processes, the workers, the dispatcher\
            thread); wrk's req/s over plain's and limit's:" \
        {server {req/s ab} {req/s wrk} {CPU all} {CPU workers} {CPU dispatcher} {wrk / plain}
            {wrk / limit}}
    dict for {base variants} $pairs {
        foreach c [linsert $variants 0 $base] {
            set row [list [label $c]]
            foreach col $columns {
                lappend row [cell $c {*}$col]
            }
            foreach anchor {plain limit} {
                lappend row [fmt [ratio [med $c wrk rps] [med $anchor wrk rps]] 2]
            }
            say "| [join $row { | }] |"
            if {$c ne $base} {
                ratio_row "ratio [dict get {exec "exec'd" python Python} [spawn $c]] / forked,\
                        N=[nworkers $c]" $c $base $columns 2
            }
        }
    }
}

# Issue 13: the dispatcher does the same work for a worker that registered
# through -path as for a forked one, so its CPU per connection should be the
# same.  ± 0.25: measured as forkexec measures, two servers of the same kind
# differed by up to 18% here (medians of 12 bursts at c=32).  Python's req/s
# has no target: it is another program, here to show what a worker in
# another language gets.
proc ::bench::not_forked_targets {configs} {
    set pairs [not_forked $configs]
    if {"forkexec" ni $configs && ![dict size $pairs]} {
        return
    }
    say "\nTargets (issue 13), ratios of medians from this run:"
    if {"forkexec" in $configs} {
        foreach c {1 32} {
            compare "dispatcher CPU per connection at c=$c, exec'd / forked workers, N=8, bursts\
                    in turn (target 1.00 ± 0.25)" [list ss8exec forkexec$c cpu_dispatcher] \
                    [list ss8 forkexec$c cpu_dispatcher] ~ 0.25 µs
        }
    }
    dict for {base variants} $pairs {
        foreach c $variants {
            if {[spawn $c] ne "python"} {
                continue
            }
            set n [nworkers $base]
            versus "req/s (wrk -c 32), Python workers / forked Tcl workers, N=$n (no target)" \
                $c $base wrk rps - {} req/s 0
            versus "CPU per connection of all server processes (ab -c 32), Python / forked Tcl\
                    workers, N=$n (no target)" $c $base ab cpu_all - {} µs
        }
    }
}

proc ::bench::targets {} {
    say "\nTargets (issues 3 and 10), ratios of medians from this run:"
    set w [med ss8 herd wakeups_per_conn]
    target "wake-ups per connection, 8 idle workers, c=1 (target 1.00 ± 0.02)" \
        $w ~ 0.02 "received/conn [fmt [med ss8 herd received_per_conn] 3]"
    versus "CPU per 1000 connections at c=32, socketserver N=8 / plain (target ≤ 1.0)" \
        ss8 plain ab cpu_all <= 1.0 ms
    versus "CPU per 1000 connections at c=1, socketserver N=8 / plain (target ≤ 1.2)" \
        ss8 plain herd cpu_all <= 1.2 ms
    versus "slow mix p99, socketserver N=8 / plain (target ≤ 0.35)" \
        ss8 plain slow p99 <= 0.35 ms
    versus "fast req/s (wrk), socketserver N=2 / limit (target ≥ 0.9)" \
        ss2 limit wrk rps >= 0.9 req/s 0
    versus "dispatcher CPU per connection at c=1, N=1000 / N=8 workers (target ≤ 1.5)" \
        ss1000 ss8 herd cpu_dispatcher <= 1.5 ms
    versus "dispatcher CPU per connection at c=32, N=1000 / N=8 workers (target ≤ 1.5)" \
        ss1000 ss8 ab cpu_dispatcher <= 1.5 ms
}

# One target line: the median of METRIC in SCENARIO for CONFIG over BASE's.
proc ::bench::versus {text config base scenario metric op goal unit {digits {}}} {
    compare $text [list $config $scenario $metric] [list $base $scenario $metric] \
        $op $goal $unit $digits
}

# One target line: the median of A over B's, each {config scenario metric}.
proc ::bench::compare {text a b op goal unit {digits {}}} {
    set a [med {*}$a]
    set b [med {*}$b]
    target $text [ratio $a $b] $op $goal "[fmt $a $digits] vs [fmt $b $digits] $unit"
}

# Whatever is still running: stop it, by pid.
proc ::bench::cleanup {} {
    variable servers
    variable clients
    foreach rec $servers {
        catch {stop $rec}
    }
    dict for {chan pids} $clients {
        killpids SIGKILL $pids
        catch {fconfigure $chan -blocking 1}
        catch {close $chan}
    }
}

# Ctrl-C or SIGTERM: stop every started process, and exit.  Trapped with
# ::socketserver::trap (a self-pipe read by the event loop, where the driver
# waits): Tclx's `signal error` deadlocks Tcl 8.6 when the signal comes while
# the event loop holds the notifier's mutex (Tcl_AsyncMark from the handler
# takes it again); seen with a SIGTERM during a run.
proc ::bench::interrupted {signal} {
    variable stopping
    if {[info exists stopping]} {
        return
    }
    set stopping 1
    catch {say "\nbench: $signal: stopping every process it started"}
    cleanup
    exit 1
}

if {![info exists ::env(TCLLIBPATH)]} {
    lappend auto_path [file join $::bench::root build]
}
if {[catch {package require socketserver} msg]} {
    puts stderr "bench: $msg: run make all, and set TCLLIBPATH to the build directory"
    exit 1
}
foreach signal {INT TERM} {
    ::socketserver::trap $signal [list ::bench::interrupted SIG$signal]
}

if {[catch {::bench::main $argv} msg opts]} {
    puts stderr "bench: $msg"
    exit 1
}
exit 0
