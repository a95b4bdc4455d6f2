# Worker pools that run themselves: ::socketserver::pool create ... returns an object command.
#
# The serving process is the monitor. It forks the workers (with ::socketserver::fork, so no
# Tclx is needed), replaces those that die (SIGCHLD, trapped with ::socketserver::trap), retires
# and replaces them after -maxconnections, resizes, reloads and stops without dropping a
# connection. It never serves connections itself.
#
# A worker takes one connection at a time and asks for the next when the previous channel has
# closed (::socketserver::onclose), so both synchronous and fileevent-driven handlers work without
# re-arming by hand. A worker that is told to retire (SIGTERM) finishes its current connection
# and exits; an idle one exits at once, and a connection the dispatcher had already sent it goes
# to another worker (the dispatcher reads back a connection that a worker had not taken).

namespace eval ::socketserver::pool {
    variable counter 0
    variable running {}    ;# pools not yet stopped, all served by one SIGCHLD trap
    variable options {-port -workers -init -maxconnections -timeout -grace -log -signals -notifier}
    namespace export create
    namespace ensemble create -subcommands {create}
}

# Usage: ::socketserver::pool create ?-option value ...? handler
proc ::socketserver::pool::create {args} {
    variable counter
    if {[llength $args] % 2 == 0} {
        return -code error -errorcode {TCL WRONGARGS} \
            "wrong # args: should be \"::socketserver::pool create ?-port port? ?-workers n? ?-init script? ?-maxconnections n? ?-timeout ms? ?-grace ms? ?-log command? ?-signals bool? ?-notifier poll|tcl? handler\""
    }
    set handler [lindex $args end]
    set config [dict create -port {} -workers 4 -init {} -maxconnections 0 -timeout 0 \
                    -grace 5000 -log [list ::socketserver::pool::LogToStderr] -signals 0 \
                    -notifier poll]
    set config [ParseOptions $config [lrange $args 0 end-1]]
    if {[dict get $config -port] eq {}} {
        dict set config -port [dict get [::socketserver::info] port]
    } else {
        ::socketserver::info [dict get $config -port] ;# errors if the port is not served here
    }
    set name ::socketserver::pool::pool[incr counter]
    namespace eval $name {
        variable config
        variable handler
        variable workers [dict create] ;# pid -> {started ms role new|old|retiring}
        variable totals [dict create respawned 0 recycled 0 timeouts 0 reloads 0]
        variable counts [dict create accepted 0 delivered 0]
        variable stopping 0
        variable stopped 0
        variable tick {}
        # A pipe whose write end only the monitor keeps: workers see EOF when it is gone.
        variable lifeline [chan pipe]
    }
    set ${name}::config $config
    set ${name}::handler $handler
    proc $name {method args} [format {::socketserver::pool::Dispatch %s $method $args} [list $name]]
    variable running
    lappend running $name
    ::socketserver::trap CHLD ::socketserver::pool::ReapAll
    if {[dict get $config -signals]} {
        ::socketserver::trap TERM [list ::socketserver::pool::StopOnSignal $name TERM]
        ::socketserver::trap INT [list ::socketserver::pool::StopOnSignal $name INT]
        ::socketserver::trap HUP [list ::socketserver::pool::Reload $name 0]
    }
    Refill $name
    Tick $name
    return $name
}

proc ::socketserver::pool::ParseOptions {config words} {
    variable options
    foreach {option value} $words {
        if {$option ni $options} {
            return -code error -errorcode [list TCL LOOKUP INDEX option $option] \
                "bad option \"$option\": must be [join [lrange $options 0 end-1] {, }], or [lindex $options end]"
        }
        switch -- $option {
            -workers - -maxconnections - -timeout - -grace {
                if {![string is entier -strict $value] || $value < 0} {
                    return -code error -errorcode {TCL VALUE NUMBER} \
                        "expected non-negative integer but got \"$value\""
                }
            }
            -signals {
                if {![string is boolean -strict $value]} {
                    return -code error -errorcode {TCL VALUE BOOLEAN} \
                        "expected boolean value but got \"$value\""
                }
            }
            -notifier {
                if {$value ni {poll tcl}} {
                    return -code error -errorcode [list TCL LOOKUP INDEX notifier $value] \
                        "bad notifier \"$value\": must be poll or tcl"
                }
            }
        }
        dict set config $option $value
    }
    return $config
}

proc ::socketserver::pool::Dispatch {name method words} {
    set methods {cget configure reload resize stats stop wait}
    if {$method ni $methods} {
        return -code error -errorcode [list TCL LOOKUP INDEX method $method] \
            "bad method \"$method\": must be [join [lrange $methods 0 end-1] {, }], or [lindex $methods end]"
    }
    if {[set ${name}::stopped] && $method ni {stats wait cget}} {
        return -code error -errorcode {SOCKETSERVER POOL STOPPED} "pool $name is stopped"
    }
    switch -- $method {
        cget {
            if {[llength $words] != 1} {
                return -code error -errorcode {TCL WRONGARGS} "wrong # args: should be \"$name cget option\""
            }
            set config [set ${name}::config]
            set option [lindex $words 0]
            if {![dict exists $config $option]} {
                ParseOptions $config [list $option {}] ;# raises the bad option error
            }
            return [dict get $config $option]
        }
        configure {
            if {[llength $words] == 0} {
                return [set ${name}::config]
            }
            if {[llength $words] % 2} {
                return -code error -errorcode {TCL WRONGARGS} "wrong # args: should be \"$name configure ?-option value ...?\""
            }
            foreach {option value} $words {
                if {$option in {-port -signals}} {
                    return -code error -errorcode {SOCKETSERVER POOL READONLY} "option \"$option\" can only be set at create"
                }
            }
            set ${name}::config [ParseOptions [set ${name}::config] $words]
            if {[dict exists $words -workers]} {
                Resize $name [dict get $words -workers]
            }
            return
        }
        resize {
            if {[llength $words] != 1} {
                return -code error -errorcode {TCL WRONGARGS} "wrong # args: should be \"$name resize count\""
            }
            set ${name}::config [ParseOptions [set ${name}::config] [list -workers [lindex $words 0]]]
            Resize $name [lindex $words 0]
            return
        }
        reload {
            if {[llength $words] != 0} {
                return -code error -errorcode {TCL WRONGARGS} "wrong # args: should be \"$name reload\""
            }
            Reload $name 1
            return
        }
        stats {
            return [Stats $name]
        }
        stop {
            set grace [dict get [set ${name}::config] -grace]
            if {[llength $words] == 2 && [lindex $words 0] eq "-grace"} {
                set grace [dict get [ParseOptions [set ${name}::config] $words] -grace]
            } elseif {[llength $words] != 0} {
                return -code error -errorcode {TCL WRONGARGS} "wrong # args: should be \"$name stop ?-grace ms?\""
            }
            Stop $name $grace
            return
        }
        wait {
            if {![set ${name}::stopped]} {
                vwait ${name}::stopped
            }
            return
        }
    }
}

proc ::socketserver::pool::Log {name message} {
    set log [dict get [set ${name}::config] -log]
    if {$log ne {}} {
        if {[catch {{*}$log $message} error options]} {
            catch {{*}[interp bgerror {}] $error $options}
        }
    }
}

proc ::socketserver::pool::LogToStderr {message} {
    puts stderr "socketserver pool [pid]: $message"
}

# Workers the pool counts toward its size: not retiring, not replaced by a reload.
proc ::socketserver::pool::Active {name} {
    set active {}
    dict for {pid worker} [set ${name}::workers] {
        if {[dict get $worker role] eq "new"} {
            lappend active $pid
        }
    }
    return $active
}

proc ::socketserver::pool::Refill {name} {
    upvar #0 ${name}::stopping stopping
    if {$stopping} {
        return
    }
    set want [dict get [set ${name}::config] -workers]
    for {set have [llength [Active $name]]} {$have < $want} {incr have} {
        Spawn $name
    }
}

proc ::socketserver::pool::Spawn {name} {
    # Output still buffered in the monitor would be written once more by the child.
    foreach chan [chan names] {
        catch {flush $chan}
    }
    set pid [::socketserver::fork]
    if {$pid == 0} {
        # The worker. It must never return into the monitor's code, whatever happens.
        catch {WorkerMain $name}
        exit 1
    }
    dict set ${name}::workers $pid [dict create started [clock milliseconds] role new]
    return $pid
}

proc ::socketserver::pool::Retire {name pid} {
    upvar #0 ${name}::workers workers
    if {[dict exists $workers $pid] && [dict get $workers $pid role] ne "retiring"} {
        dict set workers $pid role retiring
        catch {::socketserver::kill TERM $pid}
    }
}

proc ::socketserver::pool::Resize {name count} {
    set active [Active $name]
    set surplus [expr {[llength $active] - $count}]
    # Retire the newest first: the oldest are warm, and the longest-lived are recycled anyway.
    foreach pid [lrange [lreverse $active] 0 [expr {$surplus - 1}]] {
        Retire $name $pid
    }
    Log $name "resize to $count workers"
    Refill $name
}

# Starts fresh workers, waits until they are registered with the dispatcher, then retires the
# old ones. With wait, returns only when every old worker has exited (so every connection
# accepted after that is served by a new worker). If a fresh worker dies or does not register
# within 10 s (say, the new code fails in -init), the old workers stay and the reload fails.
proc ::socketserver::pool::Reload {name wait} {
    upvar #0 ${name}::workers workers
    set old [Active $name]
    foreach pid $old {
        dict set workers $pid role old
    }
    Log $name "reload: replacing [llength $old] workers"
    Refill $name
    set fresh [Active $name]
    set port [dict get [set ${name}::config] -port]
    WaitFor [expr {[clock milliseconds] + 10000}] {
        [llength [Unregistered $port $fresh]] == 0 || [llength [Alive $name $fresh]] < [llength $fresh]
    }
    if {[llength [Unregistered $port $fresh]] > 0} {
        foreach pid [Active $name] {
            Retire $name $pid
        }
        foreach pid [Alive $name $old] {
            dict set workers $pid role new
        }
        Log $name "reload failed: the new workers did not start; keeping the old ones"
        if {$wait} {
            return -code error -errorcode {SOCKETSERVER POOL RELOAD} \
                "reload failed: the new workers did not start; the old ones keep serving"
        }
        return
    }
    dict incr ${name}::totals reloads
    foreach pid $old {
        Retire $name $pid
    }
    if {$wait} {
        AwaitExit $name $old [dict get [set ${name}::config] -grace]
    }
}

# Runs the event loop until condition (an expression, evaluated in the caller's frame) holds or
# the deadline (ms) passes.
proc ::socketserver::pool::WaitFor {deadline condition} {
    variable wake
    while {![uplevel 1 [list expr $condition]] && [clock milliseconds] < $deadline} {
        set id [after 10 [list set ::socketserver::pool::wake 1]]
        vwait ::socketserver::pool::wake
        after cancel $id
    }
}

# The pids not (yet) registered with the dispatcher of port.
proc ::socketserver::pool::Unregistered {port pids} {
    set registered [dict get [::socketserver::info $port] workers]
    return [lmap pid $pids {expr {$pid in $registered ? [continue] : $pid}}]
}

# The pids the pool has not yet reaped.
proc ::socketserver::pool::Alive {name pids} {
    set workers [set ${name}::workers]
    return [lmap pid $pids {expr {[dict exists $workers $pid] ? $pid : [continue]}}]
}

# Waits up to grace ms for pids to exit, then kills the rest with SIGKILL and waits for them.
proc ::socketserver::pool::AwaitExit {name pids grace} {
    WaitFor [expr {[clock milliseconds] + $grace}] {[llength [Alive $name $pids]] == 0}
    foreach pid [Alive $name $pids] {
        Log $name "worker $pid did not finish within $grace ms: killing it"
        catch {::socketserver::kill KILL $pid}
    }
    WaitFor [expr {[clock milliseconds] + 5000}] {[llength [Alive $name $pids]] == 0}
}

proc ::socketserver::pool::Stop {name grace} {
    upvar #0 ${name}::stopping stopping
    if {$stopping} {
        return
    }
    set stopping 1
    after cancel [set ${name}::tick]
    set port [dict get [set ${name}::config] -port]
    Log $name "stopping: no new connections; waiting up to $grace ms for busy workers"
    Stats $name ;# keeps the server's last counts for stats after the stop
    catch {::socketserver::socket close $port}
    set pids [dict keys [set ${name}::workers]]
    foreach pid $pids {
        Retire $name $pid
    }
    AwaitExit $name $pids $grace
    variable running
    set running [lsearch -all -inline -exact -not $running $name]
    if {![llength $running]} {
        ::socketserver::trap CHLD {}
    }
    if {[dict get [set ${name}::config] -signals]} {
        foreach signal {TERM INT HUP} {
            ::socketserver::trap $signal {}
        }
    }
    foreach chan [set ${name}::lifeline] {
        catch {close $chan}
    }
    Log $name "stopped"
    set ${name}::stopped 1
}

proc ::socketserver::pool::StopOnSignal {name signal} {
    Log $name "SIG$signal received"
    Stop $name [dict get [set ${name}::config] -grace]
}

proc ::socketserver::pool::ReapAll {} {
    variable running
    foreach name $running {
        Reap $name
    }
}

# SIGCHLD: reap every ended child of ours, say why it ended, and replace it.
proc ::socketserver::pool::Reap {name} {
    upvar #0 ${name}::workers workers
    # Only our own pids: waiting for any child would steal the ones `exec` waits for.
    foreach pid [dict keys $workers] {
        if {[catch {::socketserver::wait -nohang $pid} ended options]} {
            if {[lindex [dict get $options -errorcode] 1] ne "ECHILD"} {
                continue
            }
            set ended [list $pid EXIT unknown] ;# reaped by someone else
        } elseif {$ended eq {}} {
            continue
        }
        lassign $ended pid how detail
        set role [dict get $workers $pid role]
        set lifetime [expr {[clock milliseconds] - [dict get $workers $pid started]}]
        dict unset workers $pid
        if {$role ne "new"} {
            continue ;# retired on purpose
        }
        if {$how eq "EXIT" && $detail eq "0"} {
            dict incr ${name}::totals recycled
            Log $name "worker $pid retired after -maxconnections: replacing it"
        } else {
            dict incr ${name}::totals respawned
            set why [expr {$how eq "EXIT" ? "exited with code $detail" : "was killed by $detail"}]
            Log $name "worker $pid $why after $lifetime ms: replacing it"
            if {$lifetime < 1000 && $how eq "EXIT"} {
                # A worker failing at start (its -init script?) is replaced after a pause, not
                # in a tight fork loop.
                after 1000 [list ::socketserver::pool::Refill $name]
                continue
            }
        }
    }
    Refill $name
}

# Every 100 ms: enforce -timeout on busy workers.
proc ::socketserver::pool::Tick {name} {
    set config [set ${name}::config]
    set timeout [dict get $config -timeout]
    if {$timeout > 0 && ![catch {::socketserver::info [dict get $config -port]} info]} {
        dict for {pid status} [dict get $info status] {
            if {[dict get $status state] eq "busy" && [dict get $status busy_ms] > $timeout
                    && [dict exists [set ${name}::workers] $pid]} {
                Log $name "worker $pid busy for over $timeout ms: killing it"
                dict incr ${name}::totals timeouts
                catch {::socketserver::kill KILL $pid}
            }
        }
    }
    set ${name}::tick [after 100 [list ::socketserver::pool::Tick $name]]
}

proc ::socketserver::pool::Stats {name} {
    set config [set ${name}::config]
    set port [dict get $config -port]
    set status {}
    # After stop the server is gone: report its last counts.
    if {![catch {::socketserver::info $port} info]} {
        set status [dict get $info status]
        set ${name}::counts [dict filter $info key accepted delivered]
    }
    set workers {}
    dict for {pid worker} [set ${name}::workers] {
        set served 0
        set state starting
        if {[dict exists $status $pid]} {
            set served [dict get $status $pid delivered]
            set state [dict get $status $pid state]
            if {$state eq "idle"} {
                set state starting ;# registered, has not asked for a connection yet
            }
        }
        if {[dict get $worker role] ne "new"} {
            set state retiring
        }
        dict set workers $pid [dict create state $state served $served started [dict get $worker started]]
    }
    return [dict merge [dict create port $port size [dict get $config -workers] workers $workers] \
        [set ${name}::counts] [set ${name}::totals]]
}

# ---- the worker side -------------------------------------------------------------------------

proc ::socketserver::pool::WorkerMain {name} {
    variable worker
    set config [set ${name}::config]
    # What the monitor had scheduled, trapped or opened is not the worker's business: its timers
    # and file events would run here too, and read what the monitor should.
    foreach id [after info] {
        after cancel $id
    }
    set lifeline [set ${name}::lifeline]
    foreach chan [chan names] {
        if {$chan ni [list stdin stdout stderr [lindex $lifeline 0]]} {
            catch {chan event $chan readable {}}
            catch {chan event $chan writable {}}
            catch {chan configure $chan -blocking 0}
            catch {close $chan}
        }
    }
    # Then, with the monitor's listening sockets closed, and before anything below makes a file
    # handler.
    if {[dict get $config -notifier] eq "poll" && [catch {::socketserver::notifier poll} error]} {
        Log $name "worker [pid]: keeps Tcl's notifier: $error"
    }
    # Only the monitor holds the lifeline's write end now: if the monitor dies, retire.
    chan event [lindex $lifeline 0] readable [list apply {{chan} {
        chan event $chan readable {}
        ::socketserver::pool::WorkerRetire
    }} [lindex $lifeline 0]]
    ::socketserver::trap CHLD {}
    ::socketserver::trap HUP {}
    ::socketserver::trap INT {#} ;# Ctrl-C reaches the whole process group: the monitor decides
    ::socketserver::trap TERM [list ::socketserver::pool::WorkerRetire]
    set worker [dict create port [dict get $config -port] handler [set ${name}::handler] \
                    max [dict get $config -maxconnections] served 0 busy 0 retiring 0]
    set code 0
    if {[catch {uplevel #0 [dict get $config -init]} error options]} {
        Log $name "worker [pid]: -init failed: $error"
        set code 1
    } elseif {[catch {WorkerArm} error options]} {
        Log $name "worker [pid]: $error"
        set code 1
    } else {
        vwait ::socketserver::pool::worker_done
        set code $::socketserver::pool::worker_done
    }
    exit $code
}

proc ::socketserver::pool::WorkerArm {} {
    variable worker
    ::socketserver::socket client -port [dict get $worker port] ::socketserver::pool::WorkerServe
}

proc ::socketserver::pool::WorkerServe {chan ip port} {
    variable worker
    dict incr worker served
    dict set worker busy 1
    ::socketserver::onclose $chan ::socketserver::pool::WorkerFinished
    if {[catch {uplevel #0 [list {*}[dict get $worker handler] $chan $ip $port]} error options]} {
        # The channel is closed so that the worker can take the next connection.
        catch {close $chan}
        return -options $options $error
    }
}

proc ::socketserver::pool::WorkerFinished {} {
    variable worker
    dict set worker busy 0
    set max [dict get $worker max]
    if {[dict get $worker retiring] || ($max > 0 && [dict get $worker served] >= $max)} {
        set ::socketserver::pool::worker_done 0
        return
    }
    if {[catch WorkerArm]} {
        set ::socketserver::pool::worker_done 0 ;# the server has closed
    }
}

proc ::socketserver::pool::WorkerRetire {} {
    variable worker
    dict set worker retiring 1
    if {![dict get $worker busy]} {
        set ::socketserver::pool::worker_done 0
    }
}
