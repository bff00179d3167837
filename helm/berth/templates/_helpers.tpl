{{/*
Names and labels.
*/}}
{{- define "berth.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "berth.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "berth.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "berth.selectorLabels" -}}
app.kubernetes.io/name: {{ include "berth.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "berth.labels" -}}
helm.sh/chart: {{ include "berth.chart" . }}
{{ include "berth.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: berth
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "berth.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "berth.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "berth.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "berth.daemonset" -}}
{{- if eq .Values.mode "daemonset" }}true{{ end }}
{{- end }}

{{/*
Addresses. berth listens on daemonset.listenAddress (daemonset mode) or on every address
of the pod (deployment mode). "local" is how a process on the same node (containerd, the
kubelet's probes, the test pod on the host network) reaches it.
*/}}
{{- define "berth.listenHost" -}}
{{- if include "berth.daemonset" . }}{{ .Values.daemonset.listenAddress }}{{ else }}0.0.0.0{{ end }}
{{- end }}

{{- define "berth.hostPort" -}}
{{- /* host, port → host:port, with brackets around an IPv6 literal */ -}}
{{- $host := index . 0 }}
{{- if contains ":" $host }}{{ printf "[%s]:%v" $host (index . 1) }}{{ else }}{{ printf "%s:%v" $host (index . 1) }}{{ end }}
{{- end }}

{{- define "berth.listen" -}}
{{- include "berth.hostPort" (list (include "berth.listenHost" .) .Values.port) }}
{{- end }}

{{- define "berth.loopbackListener" -}}
{{- $h := include "berth.listenHost" . }}
{{- if or (hasPrefix "127." $h) (eq $h "::1") (eq $h "localhost") }}true{{ end }}
{{- end }}

{{- define "berth.localHost" -}}
{{- $h := include "berth.listenHost" . }}
{{- if eq $h "0.0.0.0" }}127.0.0.1{{ else if eq $h "::" }}::1{{ else }}{{ $h }}{{ end }}
{{- end }}

{{- define "berth.scheme" -}}
{{- if .Values.tls.enabled }}https{{ else }}http{{ end }}
{{- end }}

{{- define "berth.localUrl" -}}
{{- printf "%s://%s" (include "berth.scheme" .) (include "berth.hostPort" (list (include "berth.localHost" .) .Values.port)) }}
{{- end }}

{{- define "berth.hostsDir" -}}
{{- if .Values.nodeWiring.hostsDir }}
{{- .Values.nodeWiring.hostsDir }}
{{- else if eq .Values.nodeWiring.runtime "k3s" }}
{{- "/var/lib/rancher/k3s/agent/etc/containerd/certs.d" }}
{{- else }}
{{- "/etc/containerd/certs.d" }}
{{- end }}
{{- end }}

{{- define "berth.nodeWiring" -}}
{{- if and (include "berth.daemonset" .) .Values.nodeWiring.enabled }}true{{ end }}
{{- end }}

{{/*
Secrets. A file name for an upstream's password: its namespace, made a valid Secret key.
*/}}
{{- define "berth.credentialKey" -}}
{{- regexReplaceAll "[^-._a-zA-Z0-9]" . "_" }}
{{- end }}

{{- define "berth.htpasswdSecret" -}}
{{- if .Values.htpasswd.existingSecret }}{{ .Values.htpasswd.existingSecret }}{{ else if .Values.htpasswd.content }}{{ include "berth.fullname" . }}-htpasswd{{ end }}
{{- end }}
{{- define "berth.htpasswdKey" -}}
{{- if .Values.htpasswd.existingSecret }}{{ .Values.htpasswd.existingSecretKey }}{{ else }}htpasswd{{ end }}
{{- end }}

{{- define "berth.tokenSecret" -}}
{{- if .Values.tokenKey.existingSecret }}{{ .Values.tokenKey.existingSecret }}{{ else if .Values.tokenKey.value }}{{ include "berth.fullname" . }}-token{{ end }}
{{- end }}
{{- define "berth.tokenKey" -}}
{{- if .Values.tokenKey.existingSecret }}{{ .Values.tokenKey.existingSecretKey }}{{ else }}token.key{{ end }}
{{- end }}

{{- define "berth.tlsSecret" -}}
{{- if .Values.tls.enabled }}{{ default (printf "%s-tls" (include "berth.fullname" .)) .Values.tls.existingSecret }}{{ end }}
{{- end }}

{{- define "berth.upstreamSecret" -}}
{{- include "berth.fullname" . }}-upstreams
{{- end }}

{{/* Whether the chart creates the upstream credentials Secret: some upstream has a password value. */}}
{{- define "berth.upstreamSecretNeeded" -}}
{{- range .Values.config.upstreams }}{{ if and .credentials .credentials.password }}true{{ end }}{{ end }}
{{- end }}

{{/*
Checks that values.schema.json cannot express. Included by the ConfigMap, so that every
render fails early with a message that says what to change.
*/}}
{{- define "berth.validate" -}}
{{- if .Values.htpasswd.content }}
{{- range $i, $line := splitList "\n" .Values.htpasswd.content }}
{{- $l := trim $line }}
{{- if and $l (not (hasPrefix "#" $l)) (not (regexMatch "^[^:]+:\\$2[aby]\\$[0-9]{2}\\$" $l)) }}
{{- fail (printf "htpasswd.content line %d is not a bcrypt entry (berth accepts bcrypt only: htpasswd -B -n USER)" (add1 $i)) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .Values.htpasswd.content .Values.htpasswd.existingSecret }}
{{- fail "htpasswd: set content or existingSecret, not both" }}
{{- end }}
{{- if and .Values.tokenKey.value (lt (len .Values.tokenKey.value) 32) }}
{{- fail "tokenKey.value must be at least 32 bytes (openssl rand -base64 48)" }}
{{- end }}
{{- if and .Values.tokenKey.value .Values.tokenKey.existingSecret }}
{{- fail "tokenKey: set value or existingSecret, not both" }}
{{- end }}
{{- if and (hasKey (.Values.config.auth | default dict) "token") (not (include "berth.tokenSecret" .)) }}
{{- fail "config.auth.token turns on the token flow, which needs a signing key: set tokenKey.value or tokenKey.existingSecret" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) (not (and .Values.tls.cert .Values.tls.key)) }}
{{- fail "tls.enabled needs tls.existingSecret, or both tls.cert and tls.key" }}
{{- end }}
{{- if and (include "berth.nodeWiring" .) (not .Values.daemonset.hostNetwork) }}
{{- fail "nodeWiring points containerd at 127.0.0.1, which reaches berth only with daemonset.hostNetwork: true" }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled (include "berth.daemonset" .) (include "berth.loopbackListener" .) }}
{{- fail "serviceMonitor in daemonset mode: berth listens on loopback only, so Prometheus cannot scrape it; set daemonset.listenAddress (for example 0.0.0.0) and access rules that you mean" }}
{{- end }}
{{- with (.Values.config.server | default dict).default_upstream }}
{{- $names := list }}
{{- range $.Values.config.upstreams }}{{ $names = append $names .namespace }}{{ end }}
{{- if not (has . $names) }}
{{- fail (printf "config.server.default_upstream %q is not one of config.upstreams (%s): set it to one, or to null" . (join ", " $names)) }}
{{- end }}
{{- end }}
{{- range $i, $u := .Values.config.upstreams }}
{{- with $u.credentials }}
{{- $n := 0 }}
{{- range $k := list "password" "existingSecret" "password_env" "password_file" }}{{ if index $u.credentials $k }}{{ $n = add1 $n }}{{ end }}{{ end }}
{{- if ne $n 1 }}
{{- fail (printf "config.upstreams[%d].credentials: set exactly one of password, existingSecret, password_env, password_file" $i) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
berth.toml, rendered from values. toToml writes the TOML; the chart adds what it owns.
*/}}
{{- define "berth.config" -}}
{{- $server := deepCopy (.Values.config.server | default dict) }}
{{- $_ := set $server "listen" (include "berth.listen" .) }}
{{- $_ := set $server "store" "/var/lib/berth" }}
{{- if .Values.tls.enabled }}
{{- $_ := set $server "tls" (dict "cert" "/etc/berth/tls.crt" "key" "/etc/berth/tls.key") }}
{{- end }}
{{- if and (not (include "berth.daemonset" .)) .Values.ingress.enabled .Values.ingress.hosts (not (hasKey $server "external_url")) }}
{{- $scheme := ternary "https" "http" (gt (len .Values.ingress.tls) 0) }}
{{- $_ := set $server "external_url" (printf "%s://%s" $scheme (first .Values.ingress.hosts)) }}
{{- end }}
{{- $upstreams := list }}
{{- range .Values.config.upstreams }}
{{- $u := deepCopy . }}
{{- with .credentials }}
{{- $c := dict "username" .username }}
{{- if or .password .existingSecret }}
{{- $_ := set $c "password_file" (printf "/etc/berth/upstream-credentials/%s" (include "berth.credentialKey" $u.namespace)) }}
{{- else if .password_env }}
{{- $_ := set $c "password_env" .password_env }}
{{- else if .password_file }}
{{- $_ := set $c "password_file" .password_file }}
{{- end }}
{{- $_ := set $u "credentials" $c }}
{{- end }}
{{- $upstreams = append $upstreams $u }}
{{- end }}
{{- $doc := dict "server" $server "upstream" $upstreams }}
{{- with .Values.config.cache }}
{{- $_ := set $doc "cache" . }}
{{- end }}
{{- with .Values.config.retention }}
{{- $_ := set $doc "retention" . }}
{{- end }}
{{- $auth := deepCopy (.Values.config.auth | default dict) }}
{{- if include "berth.htpasswdSecret" . }}
{{- $_ := set $auth "htpasswd" "/etc/berth/htpasswd" }}
{{- end }}
{{- if include "berth.tokenSecret" . }}
{{- $token := deepCopy ($auth.token | default dict) }}
{{- $_ := set $token "key" "/etc/berth/token.key" }}
{{- $_ := set $auth "token" $token }}
{{- end }}
{{- if $auth }}
{{- $_ := set $doc "auth" $auth }}
{{- end }}
{{- $access := deepCopy (.Values.config.access | default dict) }}
{{- if not $access }}
{{- $access = dict "metrics" (dict "anonymous" true) "repository" (list (dict "pattern" "**" "anonymous" (list "read"))) }}
{{- end }}
{{- $_ := set $doc "access" $access -}}
# berth's configuration, rendered by the berth Helm chart from its values; `berth check`
# validates it. Every key is in the configuration reference of berth's README.
{{ toToml $doc }}
{{- end }}

{{/*
The projected volume that holds berth.toml and the secrets berth reads, at /etc/berth.
*/}}
{{- define "berth.configVolume" -}}
- name: config
  projected:
    defaultMode: 0440
    sources:
      - configMap:
          name: {{ include "berth.fullname" . }}
          items:
            - key: berth.toml
              path: berth.toml
      {{- with include "berth.htpasswdSecret" . }}
      - secret:
          name: {{ . }}
          items:
            - key: {{ include "berth.htpasswdKey" $ }}
              path: htpasswd
      {{- end }}
      {{- with include "berth.tokenSecret" . }}
      - secret:
          name: {{ . }}
          items:
            - key: {{ include "berth.tokenKey" $ }}
              path: token.key
      {{- end }}
      {{- with include "berth.tlsSecret" . }}
      - secret:
          name: {{ . }}
          items:
            - key: tls.crt
              path: tls.crt
            - key: tls.key
              path: tls.key
      {{- end }}
      {{- range .Values.config.upstreams }}
      {{- if and .credentials (or .credentials.password .credentials.existingSecret) }}
      {{- $file := include "berth.credentialKey" .namespace }}
      - secret:
          name: {{ default (include "berth.upstreamSecret" $) .credentials.existingSecret }}
          items:
            - key: {{ ternary (default "password" .credentials.existingSecretKey) $file (not (empty .credentials.existingSecret)) }}
              path: upstream-credentials/{{ $file }}
      {{- end }}
      {{- end }}
{{- end }}

{{/* A probe's httpGet: on a loopback listener on the host network the kubelet must ask 127.0.0.1 (the pod IP is the node's). */}}
{{- define "berth.probeGet" -}}
{{- $ := index . 0 -}}
httpGet:
  path: {{ index . 1 }}
  port: registry
  scheme: {{ upper (include "berth.scheme" $) }}
  {{- if and (include "berth.daemonset" $) $.Values.daemonset.hostNetwork (not (has (include "berth.listenHost" $) (list "0.0.0.0" "::"))) }}
  host: {{ include "berth.localHost" $ }}
  {{- end }}
{{- end }}

{{/*
What berth reads once, at start-up, from Secrets: hashed into checksum/secrets so that a
change rolls the pods. Values only (the Secrets' labels carry the chart version). The
htpasswd file is not in it: berth re-reads that file when it changes.
*/}}
{{- define "berth.restartSecretsChecksum" -}}
{{- $creds := list }}
{{- range .Values.config.upstreams }}
{{- with .credentials }}{{ $creds = append $creds (list .password .existingSecret .existingSecretKey) }}{{ end }}
{{- end }}
{{- $data := dict "token" (list .Values.tokenKey.value .Values.tokenKey.existingSecret .Values.tokenKey.existingSecretKey) "tls" (list .Values.tls.enabled .Values.tls.cert .Values.tls.key .Values.tls.existingSecret) "upstreams" $creds }}
{{- toJson $data | sha256sum }}
{{- end }}
