# all.tcl --
#
#	Runs the socketserver tcltest suite:
#
#	    TCLLIBPATH=/path/to/build tclsh tests/all.tcl ?tcltest options?
#
#	Every tests/*.test file runs in its own tclsh (a file forks worker
#	processes and a server's state is per process, so files must not
#	share one), with the tcltest options given here (-match, -skip,
#	-verbose, -constraints, ...; -file and -notfile choose files).  Each
#	file is bounded in time (SOCKETSERVER_TEST_TIMEOUT seconds, default
#	150); a file that hangs is killed together with every process it
#	forked (it runs in a process group of its own) and counts as a
#	failure, as does a file that dies before reporting its counts.
#
#	tcltest's runAllTests never exits non-zero; this script does: it
#	exits 1 if any test failed or any file did not finish, and ends with
#	the line "N passed, M failed, K skipped".

package require Tcl 8.6
package require tcltest 2.5
package require Tclx

set testdir [file dirname [file normalize [info script]]]
::tcltest::configure -testdir $testdir {*}$argv

set timeout 150
if {[info exists env(SOCKETSERVER_TEST_TIMEOUT)]} {
    set timeout $env(SOCKETSERVER_TEST_TIMEOUT)
}
set env(SOCKETSERVER_TEST_PGROUP) 1

proc matches {name patterns} {
    foreach p $patterns {
        if {[string match $p $name]} {
            return 1
        }
    }
    return 0
}

set files {}
foreach f [lsort [glob -nocomplain -directory $testdir *.test]] {
    set tail [file tail $f]
    if {[matches $tail [::tcltest::matchFiles]] && ![matches $tail [::tcltest::skipFiles]]} {
        lappend files $f
    }
}

set out [::tcltest::outputChannel]
puts $out "Tests running in interp:  [info nameofexecutable]"
puts $out "Tests located in:  $testdir"
puts $out "Test files run in separate processes, each limited to $timeout s"
puts $out "Tests began at [clock format [clock seconds]]"
flush $out

array set total {Total 0 Passed 0 Skipped 0 Failed 0}
set failFiles {}
set brokenFiles {}

proc onReadable {chan} {
    global state
    while {[gets $chan line] >= 0} {
        if {[regexp {^([^:]+):\tTotal\t(\d+)\tPassed\t(\d+)\tSkipped\t(\d+)\tFailed\t(\d+)} \
                 $line -> name t p s f]} {
            set state(counts) [list $t $p $s $f]
            # The file is done: what it forked must let go of the pipe soon.
            after cancel $::timer
            set ::timer [after 10000 {set state(done) timeout}]
        }
        puts $::out $line
    }
    flush $::out
    if {[eof $chan]} {
        fileevent $chan readable {}
        set state(done) eof
    }
}

foreach file $files {
    set tail [file tail $file]
    puts $out "==== $tail"
    flush $out
    array unset state
    set started [clock milliseconds]
    set chan [open |[list [info nameofexecutable] $file {*}$argv 2>@1] r]
    set pid [pid $chan]
    fconfigure $chan -blocking 0 -buffering line
    fileevent $chan readable [list onReadable $chan]
    set timer [after [expr {$timeout * 1000}] {set state(done) timeout}]
    vwait state(done)
    after cancel $timer
    if {$state(done) eq "timeout"} {
        if {[info exists state(counts)]} {
            # It reported, but something it forked still holds the pipe.
            puts $out "$tail: processes left running after the file finished; killing them"
        } else {
            puts $out "$tail: did not finish within $timeout s; killing it and its workers"
        }
        catch {kill -pgroup KILL $pid}
        catch {kill KILL $pid}
    }
    fconfigure $chan -blocking 1
    if {[catch {close $chan} msg]} {
        puts $out "$tail: exited abnormally: $msg"
        set state(abnormal) 1
    }
    puts $out [format "==== %s done in %.1f s" $tail [expr {([clock milliseconds] - $started) / 1000.0}]]
    if {![info exists state(counts)] || $state(done) eq "timeout"
            || [info exists state(abnormal)]} {
        lappend brokenFiles $tail
    }
    if {[info exists state(counts)]} {
        lassign $state(counts) t p s f
        incr total(Total) $t
        incr total(Passed) $p
        incr total(Skipped) $s
        incr total(Failed) $f
        if {$f > 0} {
            lappend failFiles $tail
        }
    }
}

puts $out "\nTests ended at [clock format [clock seconds]]"
puts $out "all.tcl:\tTotal\t$total(Total)\tPassed\t$total(Passed)\tSkipped\t$total(Skipped)\tFailed\t$total(Failed)"
puts $out "Ran [llength $files] test files."
if {[llength $failFiles]} {
    puts $out "Files with failing tests: $failFiles"
}
if {[llength $brokenFiles]} {
    puts $out "Files that crashed, hung, exited abnormally or left processes behind (each counts as one failure): $brokenFiles"
}
set failed [expr {$total(Failed) + [llength $brokenFiles]}]
if {[llength $files] == 0} {
    puts $out "No test files matched."
    incr failed
}
puts $out "$total(Passed) passed, $failed failed, $total(Skipped) skipped"
flush $out
exit [expr {$failed > 0 || $total(Total) == 0}]
