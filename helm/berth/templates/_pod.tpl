{{/*
The pod template of berth, shared by the DaemonSet and the Deployment.
*/}}
{{- define "berth.podTemplate" -}}
{{- $ds := include "berth.daemonset" . -}}
metadata:
  labels:
    {{- include "berth.selectorLabels" . | nindent 4 }}
    app.kubernetes.io/component: registry
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include "berth.config" . | sha256sum }}
    checksum/secrets: {{ include "berth.restartSecretsChecksum" . }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "berth.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.automountServiceAccountToken }}
  enableServiceLinks: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if $ds }}
  hostNetwork: {{ .Values.daemonset.hostNetwork }}
  dnsPolicy: {{ .Values.daemonset.dnsPolicy }}
  {{- with .Values.daemonset.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with .Values.daemonset.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- else }}
  {{- with .Values.deployment.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with .Values.deployment.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
  {{- with .Values.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- $fix := ternary .Values.store.hostPath.fixPermissions (and .Values.store.persistence.enabled .Values.store.persistence.fixPermissions) (not (empty $ds)) }}
  {{- if or $fix (include "berth.nodeWiring" .) }}
  initContainers:
    {{- if $fix }}
    # The store must belong to the user berth runs as; a hostPath the kubelet created
    # belongs to root. Root here, with only the capabilities chown and chmod need.
    - name: store-permissions
      image: "{{ .Values.store.permissionsImage.repository }}:{{ .Values.store.permissionsImage.tag }}"
      imagePullPolicy: {{ .Values.store.permissionsImage.pullPolicy }}
      command:
        - sh
        - -c
        - |
          set -eu
          owner="{{ .Values.securityContext.runAsUser }}:{{ .Values.securityContext.runAsGroup }}"
          if [ "$(stat -c %u:%g /var/lib/berth)" != "$owner" ]; then
            echo "store-permissions: chown -R $owner /var/lib/berth"
            chown -R "$owner" /var/lib/berth
          fi
          chmod 0750 /var/lib/berth
      securityContext:
        runAsUser: 0
        runAsGroup: 0
        runAsNonRoot: false
        readOnlyRootFilesystem: true
        allowPrivilegeEscalation: false
        capabilities:
          drop: ["ALL"]
          add: ["CHOWN", "FOWNER", "DAC_READ_SEARCH"]
      resources:
        {{- toYaml .Values.initResources | nindent 8 }}
      volumeMounts:
        - name: store
          mountPath: /var/lib/berth
    {{- end }}
    {{- if include "berth.nodeWiring" . }}
    # Points the node's containerd at this berth: one hosts.toml per upstream in the
    # hosts directory, what was there backed up (`--remove` restores it).
    - name: node-wiring
      image: {{ include "berth.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      command:
        {{- include "berth.nodeConfigCommand" (list . .Values.nodeWiring.remove) | nindent 8 }}
      securityContext:
        {{- toYaml .Values.nodeWiring.securityContext | nindent 8 }}
      resources:
        {{- toYaml .Values.initResources | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/berth
          readOnly: true
        - name: hosts-dir
          mountPath: /host/etc/containerd/certs.d
        {{- if .Values.nodeWiring.credentials.existingSecret }}
        - name: node-credentials
          mountPath: /etc/berth-node
          readOnly: true
        {{- end }}
    {{- end }}
  {{- end }}
  containers:
    - name: berth
      image: {{ include "berth.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args:
        - --config
        - /etc/berth/berth.toml
        - --listen
        - {{ include "berth.listen" . | quote }}
        - --store
        - /var/lib/berth
      env:
        - name: BERTH_LOG
          value: {{ .Values.logLevel | quote }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: registry
          containerPort: {{ .Values.port }}
          protocol: TCP
      startupProbe:
        {{- include "berth.probeGet" (list . "/readyz") | nindent 8 }}
        {{- toYaml .Values.probes.startup | nindent 8 }}
      readinessProbe:
        {{- include "berth.probeGet" (list . "/readyz") | nindent 8 }}
        {{- toYaml .Values.probes.readiness | nindent 8 }}
      livenessProbe:
        {{- include "berth.probeGet" (list . "/healthz") | nindent 8 }}
        {{- toYaml .Values.probes.liveness | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/berth
          readOnly: true
        - name: store
          mountPath: /var/lib/berth
        - name: tmp
          mountPath: /tmp
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    {{- include "berth.configVolume" . | nindent 4 }}
    - name: store
      {{- if $ds }}
      hostPath:
        path: {{ .Values.store.hostPath.path }}
        type: {{ .Values.store.hostPath.type }}
      {{- else if .Values.store.persistence.enabled }}
      persistentVolumeClaim:
        claimName: {{ default (include "berth.fullname" .) .Values.store.persistence.existingClaim }}
      {{- else }}
      emptyDir:
        sizeLimit: {{ .Values.store.emptyDirSizeLimit }}
      {{- end }}
    - name: tmp
      emptyDir:
        sizeLimit: 64Mi
    {{- if include "berth.nodeWiring" . }}
    - name: hosts-dir
      hostPath:
        path: {{ include "berth.hostsDir" . }}
        type: DirectoryOrCreate
    {{- with .Values.nodeWiring.credentials.existingSecret }}
    - name: node-credentials
      secret:
        secretName: {{ . }}
        defaultMode: 0400
        items:
          - key: {{ $.Values.nodeWiring.credentials.key }}
            path: credentials
    {{- end }}
    {{- end }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/*
The node wiring command: list (root context, remove?).
*/}}
{{- define "berth.nodeConfigCommand" -}}
{{- $ := index . 0 -}}
- /usr/local/bin/berth
- node-config
- containerd
- --config
- /etc/berth/berth.toml
- --url
- {{ include "berth.localUrl" $ | quote }}
- --write
- /host/etc/containerd/certs.d
{{- if index . 1 }}
- --remove
{{- else if $.Values.nodeWiring.credentials.existingSecret }}
- --credentials-file
- /etc/berth-node/credentials
{{- end }}
{{- range $.Values.nodeWiring.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}
